"""The statements about the event log: the hot path (one batch call on the pool's raw psycopg2
connection: the reason is said once, at _APPLY_EVENTS), failed events, and the log's lookups for
replay. The objects' other statements are webhook/objects_store.py's."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
from sqlalchemy import Connection, text
from sqlalchemy.pool import PoolProxiedConnection

from webhook.results import Applied, EventFailed, Source, from_row
from webhook.signature import Event


@dataclass(frozen=True)
class EventToApply:
    payload: str  # the verified event as JSON text
    change: dict[str, Any] | None  # what it asks of stripe_customers; None: only logged
    source: Source
    actor: str | None = None  # support:<name>, for the audit, when a person acts from the console


def jsonb_text(document: str) -> str:
    # Postgres' jsonb cannot hold U+0000, which JSON (and so a signed Stripe event) may contain;
    # stored as U+FFFD instead of refusing the event for ever.
    return document.replace("\\u0000", "\\ufffd")


# The hot statements bound themselves as the engine's hook bounds the rest (database.make_engine): a
# hung database turns into a 503 within seconds (Stripe retries), never a delivery that waits with a
# worker thread (stripe_apply_batch bounds its lock waits itself). Sent with the statement in one
# simple query, Postgres runs them as one implicit transaction: still one round trip.
STATEMENT_TIMEOUT = "SET LOCAL statement_timeout = '5s'; "
# The per-event statement runs on the pool's psycopg2 connection itself (database.run_raw says
# why). The events go as text and are cast to jsonb inside stripe_apply_batch, one subtransaction
# each: one that jsonb cannot hold fails alone, not the statement it shares.
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
