"""The support console: server-rendered pages under /support/ for the person who must answer "why
doesn't this user have access?". Off (404) unless SUPPORT_USERS is set. views.py holds the pages,
auth.py sign-in and sessions, queries.py the SQL, timeline.py the words a page says."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import Engine

from webhook.config import Settings
from webhook.console import auth
from webhook.console.views import EXTENSION, bp


def install(app: Flask, engine: Engine, settings: Settings) -> None:
    if not settings.support_users:
        return
    auth.configure(app, settings)
    app.extensions[EXTENSION] = {"engine": engine, "settings": settings}
    app.register_blueprint(bp)
