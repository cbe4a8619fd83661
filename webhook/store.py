"""The statements about events and customers: the hot path (one batch call on the pool's raw
psycopg2 connection), failed events, the customer writes of the commands, and their lookups."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import PoolProxiedConnection

from webhook.database import RETRY_AT_ONCE
from webhook.results import Applied, EventFailed, Source, from_row
from webhook.verify import Event


@dataclass(frozen=True)
class EventToApply:
    payload: str  # the verified event as JSON text
    change: dict[str, Any] | None  # what it asks of stripe_customers; None: only logged
    source: Source
    actor: str | None = None  # support:<name>, for the audit, when a person acts from the console


DEADLOCK_RETRIES = 3


def jsonb_text(document: str) -> str:
    # Postgres' jsonb cannot hold U+0000, which JSON (and so a signed Stripe event) may contain;
    # stored as U+FFFD instead of refusing the event for ever.
    return document.replace("\\u0000", "\\ufffd")


# The hot statements bound themselves as the engine's hook bounds the rest (database.make_engine): a
# hung database turns into a 503 within seconds (Stripe retries), never a delivery that waits with a
# worker thread (stripe_apply_batch bounds its lock waits itself). Sent with the statement in one
# simple query, Postgres runs them as one implicit transaction: still one round trip.
STATEMENT_TIMEOUT = "SET LOCAL statement_timeout = '5s'; "
# The per-event statements run on the pool's psycopg2 connection itself. Under load, SQLAlchemy's
# statement layer (Connection, compiled text(), CursorResult) was a quarter of a worker's CPU per
# event (py-spy; README, Performance); the pool, its limits and recovery stay. The events go as
# text and are cast to jsonb inside stripe_apply_batch, one subtransaction each: one that jsonb
# cannot hold fails alone, not the statement it shares.
_APPLY_EVENTS = STATEMENT_TIMEOUT + (
    "SELECT status, settled_by, sqlstate, message "
    "FROM public.stripe_apply_batch(%s::text[], %s::text[], %s::text[], %s::text[])"
)


def _moves_a_tier(change: dict[str, Any] | None) -> bool:
    """Whether applying the change may write an organization's tier, the one thing that reads the
    transaction's settings (STRIPE_FREE_TIER): a subscription, a customer naming an organization,
    a deletion. Most deliveries are none of these, and a SET is a statement of its own."""
    return change is not None and (
        change.get("object") == "subscription"
        or bool(change.get("organization_id"))
        or change.get("action") == "delete"
    )


def apply_events(
    connection: PoolProxiedConnection, events: Sequence[EventToApply], settings: str = ""
) -> list[Applied | EventFailed]:
    """Log, deduplicate and apply the events in one statement and one transaction, each in its own
    subtransaction; each one's outcome, in their order, or the error that failed it alone.
    settings: the engine's database.transaction_settings, sent with the statement."""
    actors = [event.actor for event in events]
    cursor = connection.cursor()
    try:
        cursor.execute(
            (settings if any(_moves_a_tier(event.change) for event in events) else "") + _APPLY_EVENTS,
            (
                [jsonb_text(event.payload) for event in events],
                [None if event.change is None else jsonb_text(json.dumps(event.change)) for event in events],
                [event.source for event in events],
                actors if any(actors) else None,
            ),
        )
        return [from_row(*row) for row in cursor.fetchall()]
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
        "payload": jsonb_text(event.payload),
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


_APPLY_STATES = text(
    """
    SELECT applied.status
    FROM jsonb_array_elements(CAST(:changes AS jsonb)) WITH ORDINALITY AS change (value, position),
      LATERAL public.stripe_apply_object(change.value, :source, NULL, :as_of) AS applied
    ORDER BY change.position
    """
)
_APPLY_STATES_ACTING = text("SELECT set_config('stripe_webhook.actor', :actor, true);" + _APPLY_STATES.text)


def apply_states(
    engine: Engine, changes: list[dict[str, Any]], source: Source, as_of: int, actor: str | None = None
) -> list[str]:
    """Apply states read from the Stripe API at `as_of` (unix seconds): customers, subscriptions,
    entitlement sets (each change says which), in one statement and one transaction; a row that a
    newer event already set is left alone ('stale').
    """
    # Sorted, so concurrent batches take their locks in one order. A webhook that holds
    # a user lock can still deadlock with a batch; Postgres aborts one side and the batch retries.
    changes_json = jsonb_text(json.dumps(sorted(changes, key=lambda change: str(change["id"]))))
    for attempt in range(DEADLOCK_RETRIES):
        try:
            with engine.connect() as connection:
                result = connection.execute(
                    _APPLY_STATES_ACTING if actor else _APPLY_STATES,
                    {"changes": changes_json, "source": source, "as_of": as_of, "actor": actor},
                )
                return [str(outcome) for outcome in result.scalars()]
        except OperationalError as error:
            if getattr(error.orig, "pgcode", None) not in RETRY_AT_ONCE or attempt == DEADLOCK_RETRIES - 1:
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


def relink(connection: Connection, fix: bool) -> list[tuple[str, str]]:
    """(link, customer) for each user or organization ('user_id', 'organization_id') no customer
    holds while an unlinked customer names it; with fix, each linked to the newest such customer
    (as a deletion or a moved link would)."""
    statement = text("SELECT link || '_id', stripe_customer_id FROM public.stripe_relink(:fix)")
    return [(row[0], row[1]) for row in connection.execute(statement, {"fix": fix})]


def local_subscriptions(connection: Connection) -> dict[str, dict[str, Any]]:
    """Each subscription's status, period end (unix seconds) and items, as verify compares them."""
    statement = text(
        "SELECT stripe_subscription_id, status, extract(epoch FROM current_period_end)::bigint AS current_period_end, "
        "items FROM public.stripe_subscriptions ORDER BY stripe_subscription_id"
    )
    return {row[0]: dict(row._mapping) for row in connection.execute(statement)}


def local_entitlement_sets(connection: Connection) -> dict[str, list[str]]:
    """Each customer's set of entitlement lookup keys, sorted, for every set the consumer keeps."""
    statement = text(
        "SELECT s.stripe_customer_id, coalesce(array_agg(e.lookup_key ORDER BY e.lookup_key) "
        "FILTER (WHERE e.lookup_key IS NOT NULL), '{}') FROM public.stripe_entitlement_sets s "
        "LEFT JOIN public.stripe_entitlements e USING (stripe_customer_id) GROUP BY 1 ORDER BY 1"
    )
    return {row[0]: list(row[1]) for row in connection.execute(statement)}


def local_payment_methods(connection: Connection) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Each customer's payment methods here: id -> (brand, last4, exp_month, exp_year)."""
    statement = text(
        "SELECT stripe_customer_id, stripe_payment_method_id, brand, last4, exp_month, exp_year "
        "FROM public.stripe_payment_methods ORDER BY 1, 2"
    )
    found: dict[str, dict[str, tuple[Any, ...]]] = {}
    for row in connection.execute(statement):
        found.setdefault(row[0], {})[row[1]] = (row[2], row[3], row[4], row[5])
    return found


def local_customers(connection: Connection) -> list[tuple[str, str | None, str | None]]:
    statement = text(
        "SELECT stripe_customer_id, customer_email, customer_name FROM public.stripe_customers "
        "ORDER BY stripe_customer_id"
    )
    return [(row[0], row[1], row[2]) for row in connection.execute(statement)]
