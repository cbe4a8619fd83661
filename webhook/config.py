"""The environment, read once into one frozen object that everything else receives."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# Embedded mode keeps its database and generated secret here, relative to where it is started.
DATA_DIR = Path(".data")


class Refetch(StrEnum):
    """When a delivery reads the customer from Stripe (STRIPE_REFETCH)."""

    TIE = "tie"  # only for a same-second tie nothing else orders
    ALWAYS = "always"  # every customer event (dj-stripe's and Pay's way)
    NEVER = "never"


class Keys(NamedTuple):
    """The metadata keys the declared objects read (STRIPE_USER_ID_METADATA_KEY, STRIPE_TIER_METADATA_KEY,
    STRIPE_ORG_ID_METADATA_KEY)."""

    user_id: str = "user_id"
    tier: str = "tier"
    organization_id: str = "organization_id"


class ConfigError(Exception):
    """A bad environment value; the message names the variable and never echoes a secret."""


@dataclass(frozen=True)
class Settings:
    database_url: str | None  # None: the embedded Postgres under DATA_DIR
    webhook_secrets: tuple[str, ...]
    tolerance: int
    stripe_api_key: str | None
    stripe_api_base: str
    user_id_metadata_key: str
    expect_livemode: bool | None
    max_webhook_bytes: int
    port: int
    db_pool_size: int
    data_dir: Path
    delivery_threads: int = 8  # per server process: deliveries that may wait on Stripe or a failure's record
    refetch: Refetch = Refetch.NEVER
    heal_interval: int = 600  # seconds
    reconcile_interval: int = 86400  # seconds; 0: never
    event_retention_days: int = 90  # 0: keep every event
    stripe_api_rate: int = 20  # requests per second for background work
    support_users: tuple[tuple[str, str], ...] = ()  # (name, password hash); empty: no console
    support_session_secret: str | None = None
    tier_metadata_key: str = "tier"
    org_id_metadata_key: str = "organization_id"
    free_tier: str = "free"  # an organization's subscription_tier without an active or trialing subscription
    past_due_grace: int | None = None  # seconds a failing payment keeps access; None: as Stripe's entitlements say

    @property
    def keys(self) -> Keys:
        return Keys(self.user_id_metadata_key, self.tier_metadata_key, self.org_id_metadata_key)

    @property
    def embedded(self) -> bool:
        return self.database_url is None


def whole_number(text: str) -> int:
    """ASCII digits only: int() would also take '١٢', '+5' and '1_000'."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


def _number(
    env: Mapping[str, str], name: str, default: int, minimum: int = 0, parse: Callable[[str], int] = whole_number
) -> int:
    """A whole number (or, with parse_duration, seconds) from the environment; unset: default."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError as error:
        raise ConfigError(f"{name}: {error}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}")
    return value


MAX_DURATION = 100 * 365 * 86400  # beyond it, Postgres' interval arithmetic overflows
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_WORDS = {"second": "s", "minute": "m", "hour": "h", "day": "d", "week": "w"}
_SPELLED = re.compile(r"(\d+)\s*(second|minute|hour|day|week)s?")


def parse_duration(text: str) -> int:
    """'90s', '30m', '24h', '7d' (or '0') as seconds; ValueError says what is wrong."""
    text = text.strip()
    if text == "0":
        return 0
    if len(text) < 2 or text[-1] not in _UNITS or not text[:-1].isdigit():
        raise ValueError(f"{text!r} is not a duration like 30m, 24h or 7d")
    seconds = int(text[:-1]) * _UNITS[text[-1]]
    if seconds > MAX_DURATION:
        raise ValueError(f"{text!r} is longer than 100 years")
    return seconds


SUPPORT_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def _support_users(raw: str) -> tuple[tuple[str, str], ...]:
    """`name:hash,…` as `support-user NAME` prints them (Werkzeug's salted hashes)."""
    users = []
    for entry in (part.strip() for part in raw.split(",") if part.strip()):
        name, _, hashed = entry.partition(":")
        if not SUPPORT_NAME.fullmatch(name) or not hashed.startswith(("scrypt:", "pbkdf2:")):
            raise ConfigError("SUPPORT_USERS must be name:hash entries made by `python -m webhook support-user NAME`")
        users.append((name, hashed))
    if len({name for name, _ in users}) != len(users):
        raise ConfigError("SUPPORT_USERS names one person twice")
    return tuple(users)


def _database_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("DATABASE_URL", "").strip()
    if not raw:
        return None
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError("DATABASE_URL is not a valid postgresql:// URL") from None
    if url.get_backend_name() not in ("postgres", "postgresql"):
        raise ConfigError("DATABASE_URL must be a postgresql:// URL")
    return raw


def _secrets(raw: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not values:
        raise ConfigError("STRIPE_WEBHOOK_SECRET is empty")
    if any(not value.startswith("whsec_") for value in values):
        raise ConfigError("STRIPE_WEBHOOK_SECRET must be whsec_… secrets, comma-separated")
    return values


def embedded_secret(data_dir: Path) -> str:
    """The dev secret of embedded mode: generated once, then kept so `send` and the server agree."""
    path = data_dir / "webhook_secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = "whsec_" + secrets.token_urlsafe(32)
    # O_EXCL: two processes starting at once must not end up with different secrets.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return secret


DEFAULT_MAX_WEBHOOK_BYTES = 1_048_576


def max_webhook_bytes(env: Mapping[str, str]) -> int:
    """MAX_WEBHOOK_BYTES: the app answers 413 above it, and the HTTP worker reads no more."""
    return _number(env, "MAX_WEBHOOK_BYTES", DEFAULT_MAX_WEBHOOK_BYTES, minimum=1)


# Set for each transaction (database.make_engine), so plain words only: no quote, no percent sign.
_TIER = re.compile(r"[\w .:+-]{1,64}")


def free_tier(env: Mapping[str, str]) -> str:
    tier = env.get("STRIPE_FREE_TIER", "").strip() or "free"
    if _TIER.fullmatch(tier) is None:
        raise ConfigError("STRIPE_FREE_TIER must be up to 64 letters, digits, spaces or _ . : + -")
    return tier


def parse_interval(text: str) -> int:
    """A duration as parse_duration reads it, or spelled out as Postgres writes an interval
    ('7 days', '72 hours', '1 week'), as seconds."""
    spelled = _SPELLED.fullmatch(text.strip().lower())
    if spelled is None:
        return parse_duration(text)
    number, word = int(spelled[1]), _WORDS[spelled[2]]
    return parse_duration(f"{number * 7}d" if word == "w" else f"{number}{word}")


def past_due_grace(env: Mapping[str, str]) -> int | None:
    """STRIPE_PAST_DUE_GRACE: unset, access is what Stripe's entitlements say; set, how long a
    failing payment keeps it (0: not at all)."""
    if not env.get("STRIPE_PAST_DUE_GRACE", "").strip():
        return None
    return _number(env, "STRIPE_PAST_DUE_GRACE", 0, parse=parse_interval)


def load_settings(env: Mapping[str, str] | None = None, *, make_secret: bool = True) -> Settings:
    """The environment as Settings. make_secret=False (`send`): in embedded mode, no secret is
    generated here when none is kept: webhook_secrets is then empty, and the caller looks further."""
    env = os.environ if env is None else env
    database_url = _database_url(env)
    data_dir = DATA_DIR.resolve()
    raw_secret = env.get("STRIPE_WEBHOOK_SECRET", "").strip()
    if raw_secret:
        webhook_secrets = _secrets(raw_secret)
    elif database_url is None:
        kept = (data_dir / "webhook_secret").exists()
        webhook_secrets = (embedded_secret(data_dir),) if make_secret or kept else ()
    else:
        raise ConfigError("STRIPE_WEBHOOK_SECRET is required when DATABASE_URL is set")

    api_key = env.get("STRIPE_API_KEY", "").strip() or None
    if api_key is not None and not api_key.startswith(("sk_", "rk_")):
        raise ConfigError("STRIPE_API_KEY must be an sk_… or rk_… key")

    livemode_raw = env.get("STRIPE_EXPECT_LIVEMODE", "").strip().lower()
    if livemode_raw not in ("", "true", "false"):
        raise ConfigError("STRIPE_EXPECT_LIVEMODE must be true or false")

    refetch_raw = env.get("STRIPE_REFETCH", "").strip().lower() or ("tie" if api_key else "never")
    if refetch_raw not in set(Refetch):
        raise ConfigError("STRIPE_REFETCH must be tie, always or never")
    refetch = Refetch(refetch_raw)
    if refetch is not Refetch.NEVER and api_key is None:
        raise ConfigError(f"STRIPE_REFETCH={refetch} needs STRIPE_API_KEY")

    api_base = env.get("STRIPE_API_BASE", "").strip() or "https://api.stripe.com"
    if not api_base.startswith(("http://", "https://")):
        raise ConfigError("STRIPE_API_BASE must be an http(s):// URL")

    return Settings(
        database_url=database_url,
        webhook_secrets=webhook_secrets,
        tolerance=_number(env, "STRIPE_WEBHOOK_TOLERANCE", 300, minimum=1),
        stripe_api_key=api_key,
        stripe_api_base=api_base.rstrip("/"),
        user_id_metadata_key=env.get("STRIPE_USER_ID_METADATA_KEY", "").strip() or "user_id",
        expect_livemode=None if not livemode_raw else livemode_raw == "true",
        max_webhook_bytes=max_webhook_bytes(env),
        port=_number(env, "PORT", 8000, minimum=1),
        db_pool_size=_number(env, "DB_POOL_SIZE", 5, minimum=1),
        data_dir=data_dir,
        # GUNICORN_THREADS: its name when gunicorn's own threads did this.
        delivery_threads=_number(env, "DELIVERY_THREADS", _number(env, "GUNICORN_THREADS", 8, minimum=1), minimum=1),
        refetch=refetch,
        heal_interval=_number(env, "HEAL_INTERVAL", 600, minimum=1, parse=parse_duration),
        reconcile_interval=_number(env, "RECONCILE_INTERVAL", 86400, parse=parse_duration),
        event_retention_days=_number(env, "EVENT_RETENTION_DAYS", 90),
        stripe_api_rate=_number(env, "STRIPE_API_RATE", 20, minimum=1),
        support_users=_support_users(env.get("SUPPORT_USERS", "")),
        support_session_secret=env.get("SUPPORT_SESSION_SECRET", "").strip() or None,
        tier_metadata_key=env.get("STRIPE_TIER_METADATA_KEY", "").strip() or "tier",
        org_id_metadata_key=env.get("STRIPE_ORG_ID_METADATA_KEY", "").strip() or "organization_id",
        free_tier=free_tier(env),
        past_due_grace=past_due_grace(env),
    )
