"""Every SQL statement the consumer runs, and the engine that runs them."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg2
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import PoolProxiedConnection

from webhook.verify import Event

# The SQL ships inside the package (a wheel, a Docker image); `db/` at the top of a checkout
# points here.
DB_DIR = resources.files("webhook") / "db"


@dataclass(frozen=True)
class EventToApply:
    payload: str  # the verified event as JSON text
    change: dict[str, Any] | None  # what it asks of stripe_customers; None: only logged
    source: str  # webhook | replay | api
    actor: str | None = None  # support:<name>, for the audit, when a person acts from the console


DEADLOCK_RETRIES = 3
LOCK_TIMEOUT = "2s"  # a held lock turns into a quick error (503 for a delivery), not a wait
SIDE_POOL_SIZE = 2
# Left as they are: what cannot run inside a transaction, and the transaction's own control
# (a savepoint's rollback must run in a transaction that already failed).
_UNBOUNDED = re.compile(
    r"\s*(VACUUM|SAVEPOINT|RELEASE|ROLLBACK|COMMIT|BEGIN|(CREATE|DROP)\s+DATABASE|(CREATE|DROP|REINDEX)\b[^;]*\bCONCURRENTLY)\b",
    re.IGNORECASE,
)


def make_engine(
    database_url: str, pool_size: int, *, statement_timeout: str = "5s", pool_timeout: float = 10
) -> Engine:
    """An engine whose every statement is bounded (statement_timeout, lock_timeout)."""
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
    bound = f"SET LOCAL statement_timeout = '{statement_timeout}'; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; "

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


def side_engine(database_url: str) -> Engine:
    """The support console's and /metrics' own small pool: whatever a browser or a scrape does
    (a page waiting on a locked table, a dozen tabs) never takes a connection deliveries need."""
    return make_engine(database_url, SIDE_POOL_SIZE, statement_timeout="3s", pool_timeout=3)


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


def _jsonb_text(document: str) -> str:
    # Postgres' jsonb cannot hold U+0000, which JSON (and so a signed Stripe event) may contain;
    # stored as U+FFFD instead of refusing the event for ever.
    return document.replace("\\u0000", "\\ufffd")


# Every statement is bounded, per transaction so that a transaction-mode pooler is fine: a hung
# database turns into a 503 within seconds (Stripe retries), never a delivery that waits with a
# worker thread (stripe_apply_event bounds its lock waits itself). Sent with the statement in one
# simple query, Postgres runs them as one implicit transaction: still one round trip.
STATEMENT_TIMEOUT = "SET LOCAL statement_timeout = '5s'; "
# SQLSTATEs that mean "not now" rather than "this event is bad": lock and statement timeouts,
# deadlock and serialization victims, a server refusing connections. Nothing was written.
BUSY = {"55P03", "57014", "40P01", "40001", "53300", "57P03"}

# The per-event statements run on the pool's psycopg2 connection itself. Under load, SQLAlchemy's
# statement layer (Connection, compiled text(), CursorResult) was a quarter of a worker's CPU per
# event (py-spy; README, Performance); the pool, its limits and recovery stay. The events go as
# text and are cast to jsonb inside stripe_apply_events, one subtransaction each: one that jsonb
# cannot hold fails alone, not the statement it shares.
_APPLY_EVENTS = STATEMENT_TIMEOUT + "SELECT public.stripe_apply_events(%s::text[], %s::text[], %s::text[], %s::text[])"


def apply_events(connection: PoolProxiedConnection, events: Sequence[EventToApply]) -> list[str]:
    """Log, deduplicate and apply the events in one statement and one transaction, each in its own
    subtransaction; each one's outcome name, or 'error:<SQLSTATE>:<message>' for one that failed."""
    actors = [event.actor for event in events]
    cursor = connection.cursor()
    try:
        cursor.execute(
            _APPLY_EVENTS,
            (
                [_jsonb_text(event.payload) for event in events],
                [None if event.change is None else _jsonb_text(json.dumps(event.change)) for event in events],
                [event.source for event in events],
                actors if any(actors) else None,
            ),
        )
        return [str(outcome) for outcome in cursor.fetchall()[0][0]]
    finally:
        cursor.close()


_RECORD_FAILURE = (
    STATEMENT_TIMEOUT
    + """
    INSERT INTO public.stripe_webhook_events AS e
      (id, type, api_version, livemode, created, payload, status, attempts, last_error, stripe_customer_id)
    SELECT %(id)s, %(type)s, p ->> 'api_version', %(livemode)s, to_timestamp(%(created)s), p, 'failed', 1,
           %(error)s, public.stripe_event_customer_id(p)
    FROM (SELECT {payload} AS p) AS delivery
    ON CONFLICT (id) DO UPDATE SET status = 'failed', attempts = e.attempts + 1, last_error = EXCLUDED.last_error
      WHERE e.status IN ('received', 'failed')
"""
)
# A signed event that jsonb cannot hold (a lone UTF-16 surrogate, a number beyond numeric's range)
# is kept as the JSON text it came as, inside a jsonb string: readable, never applied by replay.
_AS_JSONB = _RECORD_FAILURE.format(payload="%(payload)s::jsonb")
_AS_JSONB_STRING = _RECORD_FAILURE.format(payload="to_jsonb(%(payload)s::text)")


def record_failure(connection: PoolProxiedConnection, event: Event, error: str) -> None:
    """Keep a failed event with its error so Stripe's retry or `replay` can run it again."""
    params = {
        "id": event.id,
        "type": event.type,
        "livemode": event.livemode,
        "created": event.created,
        "payload": _jsonb_text(event.payload),
        "error": error,
    }
    cursor = connection.cursor()
    try:
        try:
            cursor.execute(_AS_JSONB, params)
        except psycopg2.DataError:
            cursor.execute(_AS_JSONB_STRING, params)
    finally:
        cursor.close()


def connection_lost(engine: Engine, connection: PoolProxiedConnection, error: BaseException) -> bool:
    """Whether `error` closed the connection. If so, every pooled connection opened before now is
    presumed dead as well (a server restart kills them all) and each is replaced when next checked
    out, as SQLAlchemy's own disconnect handling does; this one is dropped at once."""
    lost = isinstance(error, psycopg2.Error) and bool(getattr(connection.dbapi_connection, "closed", 1))
    if lost:
        engine.pool._invalidate(connection, error if isinstance(error, Exception) else None)
    return lost


def busy(error: BaseException) -> bool:
    return getattr(error, "pgcode", None) in BUSY


_SCHEMA_READY = text("SELECT to_regprocedure('public.stripe_apply_events(text[], text[], text[], text[])') IS NOT NULL")


def schema_ready(connection: Connection) -> bool:
    return bool(connection.execute(_SCHEMA_READY).scalar_one())


_APPLY_CUSTOMERS = text(
    """
    SELECT applied.status
    FROM jsonb_array_elements(CAST(:changes AS jsonb)) WITH ORDINALITY AS change (value, position),
      LATERAL public.stripe_apply_customer(change.value, :source, NULL, :as_of) AS applied
    ORDER BY change.position
    """
)
_APPLY_CUSTOMERS_ACTING = text("SELECT set_config('stripe_webhook.actor', :actor, true);" + _APPLY_CUSTOMERS.text)


def apply_customers(
    engine: Engine, changes: list[dict[str, Any]], source: str, as_of: int, actor: str | None = None
) -> list[str]:
    """Apply customer states read from the Stripe API at `as_of` (unix seconds), in one statement
    and one transaction; a row that a newer event already set is left alone ('stale')."""
    # Sorted, so concurrent batches take their customer locks in one order. A webhook that holds
    # a user lock can still deadlock with a batch; Postgres aborts one side and the batch retries.
    changes_json = _jsonb_text(json.dumps(sorted(changes, key=lambda change: str(change["id"]))))
    for attempt in range(DEADLOCK_RETRIES):
        try:
            with engine.connect() as connection:
                result = connection.execute(
                    _APPLY_CUSTOMERS_ACTING if actor else _APPLY_CUSTOMERS,
                    {"changes": changes_json, "source": source, "as_of": as_of, "actor": actor},
                )
                return [str(outcome) for outcome in result.scalars()]
        except OperationalError as error:
            if getattr(error.orig, "pgcode", None) not in ("40P01", "40001") or attempt == DEADLOCK_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def select_events(
    connection: Connection, *, event_id: str | None, status: str, since_seconds: int | None
) -> list[tuple[str, str]]:
    """(id, payload) of the stored events to replay, oldest first."""
    if event_id is not None:
        statement = text("SELECT id, payload::text FROM public.stripe_webhook_events WHERE id = :id")
        return [(row[0], row[1]) for row in connection.execute(statement, {"id": event_id})]
    statement = text(
        """
        SELECT id, payload::text FROM public.stripe_webhook_events
        WHERE status = :status
          AND (CAST(:since AS integer) IS NULL OR received_at >= now() - make_interval(secs => :since))
        ORDER BY created, id
        """
    )
    return [(row[0], row[1]) for row in connection.execute(statement, {"status": status, "since": since_seconds})]


def logged_event_ids(connection: Connection, event_ids: list[str]) -> set[str]:
    statement = text("SELECT id FROM public.stripe_webhook_events WHERE id = ANY(:ids)")
    return set(connection.execute(statement, {"ids": event_ids}).scalars())


def customer_id_for_user(connection: Connection, user_id: str) -> str | None:
    statement = text("SELECT stripe_customer_id FROM public.stripe_customers WHERE user_id = :user_id")
    return connection.execute(statement, {"user_id": user_id}).scalar_one_or_none()


def user_email(connection: Connection, user_id: str) -> tuple[bool, str | None]:
    """(the auth.users row exists, its email)."""
    row = connection.execute(text("SELECT email FROM auth.users WHERE id = :id"), {"id": user_id}).first()
    return (row is not None, None if row is None else row[0])


def recent_livemodes(connection: Connection) -> set[bool]:
    """The modes of the newest applied events (through the status index): the database's mode."""
    statement = text(
        "SELECT DISTINCT livemode FROM (SELECT livemode FROM public.stripe_webhook_events "
        "WHERE status = 'processed' ORDER BY received_at DESC LIMIT 100) AS recent"
    )
    return set(connection.execute(statement).scalars())


def relink_users(connection: Connection, fix: bool) -> list[tuple[str, str]]:
    """(user, customer) for each user no customer holds while an unlinked customer names them;
    with fix, each linked to the newest such customer (as a deletion or a moved link would)."""
    statement = text("SELECT user_id::text, stripe_customer_id FROM public.stripe_relink_users(:fix)")
    return [(row[0], row[1]) for row in connection.execute(statement, {"fix": fix})]


def local_customers(connection: Connection) -> list[tuple[str, str | None, str | None]]:
    statement = text(
        "SELECT stripe_customer_id, customer_email, customer_name FROM public.stripe_customers "
        "ORDER BY stripe_customer_id"
    )
    return [(row[0], row[1], row[2]) for row in connection.execute(statement)]
