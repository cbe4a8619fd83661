"""Who may use the console: sign-in per person against SUPPORT_USERS (Werkzeug's salted hashes), a
signed session cookie naming a session the database keeps (so signing out, expiry, or a changed or
removed person ends it on the server, whatever a copied cookie says), CSRF tokens (Flask-WTF) on
every POST, and a count of sign-in attempts per name, kept in the database and taken before the
password is checked, that turns further attempts away for a quarter of an hour."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import timedelta

from flask import Flask, g, session
from flask_wtf.csrf import CSRFProtect
from sqlalchemy import Engine
from werkzeug.security import check_password_hash, generate_password_hash

from webhook.config import Settings
from webhook.console import queries
from webhook.logs import log

SESSION_HOURS = 8
MAX_FAILED_SIGNINS = 5
SIGNIN_WINDOW_SECONDS = 15 * 60
# Checked against when the name is unknown, so a wrong name costs the same time as a wrong password.
_NOBODY = generate_password_hash("nobody has this password")
csrf = CSRFProtect()


def session_secret(settings: Settings) -> bytes:
    """SUPPORT_SESSION_SECRET, or one derived from SUPPORT_USERS (salted hashes nobody can guess),
    so every worker and host agrees without another secret to distribute, and changing the people
    signs everyone out. Never derived from the webhook secrets: the two never share credentials."""
    if settings.support_session_secret:
        return settings.support_session_secret.encode()
    users = ",".join(f"{name}:{hashed}" for name, hashed in settings.support_users)
    return hmac.new(b"stripe-webhook support console session", users.encode(), hashlib.sha256).digest()


def configure(app: Flask, settings: Settings) -> None:
    app.secret_key = session_secret(settings)
    app.config.update(
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
        SESSION_COOKIE_NAME="support_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        WTF_CSRF_CHECK_DEFAULT=False,  # the console checks its own POSTs; Stripe's are signed instead
    )
    csrf.init_app(app)


def _fingerprint(hashed: str) -> str:
    # In the session: a changed password or a removed person ends their sessions.
    return hashlib.sha256(hashed.encode()).hexdigest()[:16]


class TooManyAttempts(Exception):
    pass


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign_in(engine: Engine, settings: Settings, name: str, password: str) -> bool:
    users = dict(settings.support_users)
    key = name if name in users else "?"  # unknown names share one count: no row per guess
    if queries.count_signin_attempt(engine, key, SIGNIN_WINDOW_SECONDS) > MAX_FAILED_SIGNINS:
        raise TooManyAttempts()
    if not check_password_hash(users.get(name, _NOBODY), password) or name not in users:
        log(logging.WARNING, "support sign-in failed", name=key)
        return False
    queries.clear_signin_attempts(engine, key)
    token = secrets.token_urlsafe(32)
    queries.open_session(engine, _token_hash(token), name, SESSION_HOURS * 3600)
    session.clear()
    session.permanent = True
    session["who"] = name
    session["token"] = token
    session["fingerprint"] = _fingerprint(users[name])
    log(logging.INFO, "support sign-in", name=name)
    return True


def sign_out(engine: Engine) -> None:
    token = session.get("token")
    if isinstance(token, str):
        queries.close_session(engine, _token_hash(token))
    session.clear()


def signed_in(engine: Engine, settings: Settings) -> str | None:
    """The person of this request's session, if it is still valid (asked of the database once a
    request)."""
    if "support_user" not in g:
        g.support_user = _check_session(engine, settings)
    return g.support_user  # type: ignore[no-any-return]


def _check_session(engine: Engine, settings: Settings) -> str | None:
    name, token = session.get("who"), session.get("token")
    hashed = dict(settings.support_users).get(name or "")
    if hashed is None or not isinstance(token, str) or session.get("fingerprint") != _fingerprint(hashed):
        return None
    return str(name) if queries.session_open(engine, _token_hash(token), str(name)) else None
