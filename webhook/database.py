"""The database's one owner: the engines (the delivery pool, the side pool of the console and
/metrics), every statement bounded, where the SQL files are, and what an error from Postgres means.
The statements themselves are grouped by what they touch: store.py (events and customers, the hot
path on the raw cursor), jobs_store.py (the background jobs), console/queries.py (the console)."""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

import psycopg2
from psycopg2 import errorcodes
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import PoolProxiedConnection

# The SQL ships inside the package (a wheel, a Docker image); `db/` at the top of a checkout
# points here.
DB_DIR = resources.files("webhook") / "db"


LOCK_TIMEOUT = "2s"  # a held lock turns into a quick error (503 for a delivery), not a wait
SIDE_POOL_SIZE = 2
# Left as they are: what cannot run inside a transaction, and the transaction's own control
# (a savepoint's rollback must run in a transaction that already failed).
_UNBOUNDED = re.compile(
    r"\s*(VACUUM|SAVEPOINT|RELEASE|ROLLBACK|COMMIT|BEGIN|(CREATE|DROP)\s+DATABASE|(CREATE|DROP|REINDEX)\b[^;]*\bCONCURRENTLY)\b",
    re.IGNORECASE,
)


# What each transaction of an engine tells the SQL besides its bounds (the raw-cursor statements of
# store.py send it themselves): the consumer's settings that triggers read, whichever path wrote.
_TRANSACTION_SETTINGS: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def transaction_settings(engine: Engine) -> str:
    return _TRANSACTION_SETTINGS.get(engine, "")


def make_engine(
    database_url: str,
    pool_size: int,
    *,
    statement_timeout: str = "5s",
    pool_timeout: float = 10,
    free_tier: str = "free",
) -> Engine:
    """An engine whose every statement is bounded (statement_timeout, lock_timeout) and carries
    STRIPE_FREE_TIER (config.free_tier: no quote in it) for an organization's tier."""
    url = make_url(database_url).set(drivername="postgresql+psycopg2")
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,  # DB_POOL_SIZE is a promise to the database's connection limit
        pool_timeout=pool_timeout,
        # Each event is one statement, so autocommit makes it one round trip and one transaction;
        # nothing outlives it, which is what a transaction-mode pooler needs.
        isolation_level="AUTOCOMMIT",
        # ... so no transaction is ever open when a connection goes back, and the pool's
        # rollback-on-return has nothing to undo.
        pool_reset_on_return=None,
        connect_args={"connect_timeout": 5, "application_name": "stripe-webhook"},
    )
    settings = _TRANSACTION_SETTINGS[engine] = f"SET LOCAL stripe_webhook.free_tier = '{free_tier}'; "
    bounds = f"SET LOCAL statement_timeout = '{statement_timeout}'; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; "
    bound = bounds + settings

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def bounded(
        connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> tuple[str, Any]:
        # Sent with the statement in one simple query: one round trip, one (implicit or open)
        # transaction, nothing left on the connection (a transaction-mode pooler is fine).
        if executemany or _UNBOUNDED.match(statement):
            return statement, parameters
        return bound + statement, parameters

    return engine


def side_engine(database_url: str, free_tier: str = "free") -> Engine:
    """The support console's and /metrics' own small pool: whatever a browser or a scrape does
    (a page waiting on a locked table, a dozen tabs) never takes a connection deliveries need."""
    return make_engine(database_url, SIDE_POOL_SIZE, statement_timeout="3s", pool_timeout=3, free_tier=free_tier)


def describe_target(database_url: str) -> str:
    """Where the database is, for error messages: host, port, database and user, never the password."""
    url = make_url(database_url)
    host = url.host or url.query.get("host") or "local socket"
    return f"host={host} port={url.port or 5432} database={url.database} user={url.username}"


def run_sql(connection: Connection, sql: str, lock_timeout: str | None = None) -> int:
    """sql as one simple query, which Postgres runs as one implicit transaction (so a step that fails
    half-way leaves nothing behind); the row count of its last statement. No parameters, so psycopg2
    leaves the SQL's own % signs (LIKE 'customer.%') alone. With lock_timeout, the transaction gives
    up on a lock it cannot get in that long."""
    concurrently = lock_timeout is not None and "CONCURRENTLY" in sql
    if lock_timeout and not concurrently:
        sql = f"SET LOCAL lock_timeout = '{lock_timeout}';\n{sql}"
    cursor = connection.connection.cursor()
    try:
        if concurrently:
            # CREATE/DROP INDEX CONCURRENTLY cannot run inside a transaction, where SET LOCAL
            # would do: a session setting, reset after (so db migrate wants a direct connection).
            cursor.execute(f"SET lock_timeout = '{lock_timeout}'")
        cursor.execute(sql)
        return int(cursor.rowcount)
    finally:
        if concurrently:
            cursor.execute("RESET lock_timeout")
        cursor.close()


def index_valid(connection: Connection, name: str) -> bool | None:
    """Whether the index public.<name> is valid; None when there is none."""
    found = connection.execute(
        text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"), {"name": f"public.{name}"}
    ).scalar_one_or_none()
    return None if found is None else bool(found)


# SQLSTATEs that mean "not now" rather than "this event is bad": lock and statement timeouts,
# deadlock and serialization victims, a server refusing connections. Nothing was written.
BUSY = {
    errorcodes.LOCK_NOT_AVAILABLE,
    errorcodes.QUERY_CANCELED,
    errorcodes.DEADLOCK_DETECTED,
    errorcodes.SERIALIZATION_FAILURE,
    errorcodes.TOO_MANY_CONNECTIONS,
    errorcodes.CANNOT_CONNECT_NOW,
}
# Worth running again at once: this transaction lost to another one.
RETRY_AT_ONCE = {errorcodes.DEADLOCK_DETECTED, errorcodes.SERIALIZATION_FAILURE}
RETRIES = 2  # a transaction lost to another is run this many more times


def lost_to_another(error: BaseException) -> bool:
    """A deadlock's victim or a serialization failure: it wrote nothing, and can run again at once."""
    cause = error.orig if isinstance(error, DBAPIError) else error
    return getattr(cause, "pgcode", None) in RETRY_AT_ONCE


T = TypeVar("T")


def retried(once: Callable[[], T]) -> T:
    """once(), run again (RETRIES times at most) while it loses to another transaction. The one
    place that decides this: the batch statement sends its events that lost the same way."""
    for attempt in range(RETRIES + 1):
        try:
            return once()
        except DBAPIError as error:
            if not lost_to_another(error) or attempt == RETRIES:
                raise
    raise AssertionError("unreachable")


def connection_lost(engine: Engine, connection: PoolProxiedConnection, error: BaseException) -> bool:
    """Whether `error` closed the connection. If so, every pooled connection opened before now is
    presumed dead as well (a server restart kills them all) and each is replaced when next checked
    out, as SQLAlchemy's own disconnect handling does; this one is dropped at once."""
    lost = isinstance(error, psycopg2.Error) and bool(getattr(connection.dbapi_connection, "closed", 1))
    if lost:
        engine.pool._invalidate(connection, error if isinstance(error, Exception) else None)
    return lost


# Two styles of SQL in Python, each with its place. The statements run per delivery or per Stripe
# read (the event batch in store.py, the thin queue, the read budget) go on the pooled psycopg2
# connection's own cursor, with psycopg2's %(name)s parameters: under load SQLAlchemy's statement
# layer (Connection, compiled text(), CursorResult) cost a large share of a worker's CPU per event
# (py-spy; docs/performance.md), while the pool, its limits and its recovery stay. Everything else
# (commands, the console, background jobs) uses SQLAlchemy's text() with :name parameters.
def run_raw(engine: Engine, statement: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One hot statement (it bounds itself) on a pooled connection's own cursor: the rows of its
    last result. A connection the server dropped leaves the pool with every one as old
    (connection_lost)."""
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute(statement, params)
        return list(cursor.fetchall()) if cursor.description else []
    except psycopg2.Error as error:
        connection_lost(engine, connection, error)
        raise
    finally:
        connection.close()


def busy(error: BaseException) -> bool:
    return getattr(error, "pgcode", None) in BUSY


_SCHEMA_READY = text(
    "SELECT to_regprocedure('public.stripe_apply_batch(text[], text[], text[], text[])') IS NOT NULL "
    "AND to_regclass('public.stripe_support_sessions') IS NOT NULL"
)


def schema_ready(connection: Connection) -> bool:
    return bool(connection.execute(_SCHEMA_READY).scalar_one())
