"""The SQL about the declared objects outside the hot path (webhook/store.py has that): states read
from Stripe applied in one statement, the rows reconciliation compares, the links it mends, and the
lookups the commands and the console share. SQLAlchemy `text()` throughout: these run a few times
a minute, not per delivery."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Engine, text

from webhook import database, objects
from webhook.objects import StripeObject
from webhook.results import Source
from webhook.store import jsonb_text

_APPLY_STATES = text(
    """
    SELECT set_config('stripe_webhook.actor', coalesce(CAST(:actor AS text), ''), true);
    SELECT applied.status
    FROM jsonb_array_elements(CAST(:changes AS jsonb)) WITH ORDINALITY AS change (value, position),
      LATERAL public.stripe_apply_object(change.value, :source, NULL, :as_of) AS applied
    ORDER BY change.position
    """
)


def apply_states(
    engine: Engine, changes: list[dict[str, Any]], source: Source, as_of: int, actor: str | None = None
) -> list[str]:
    """Apply states read from the Stripe API at `as_of` (unix seconds), of any declared objects
    (each change says which), in one statement and one transaction; a row that a newer event
    already set is left alone ('stale'). Sorted, so concurrent batches take their locks in one
    order; a deadlock with a delivery holding a link's lock is tried again (database.retried)."""
    changes_json = jsonb_text(json.dumps(sorted(changes, key=lambda change: str(change["id"]))))

    def once() -> list[str]:
        with engine.connect() as connection:
            result = connection.execute(
                _APPLY_STATES, {"changes": changes_json, "source": source, "as_of": as_of, "actor": actor}
            )
            return [str(outcome) for outcome in result.scalars()]

    return database.retried(once)


def customers_with_objects(engine: Engine) -> list[str]:
    """The customers that have any object here beyond their own row, in id order."""
    parts = [
        f"SELECT customer FROM ({declared.local_sql}) AS local" for declared in objects.OBJECTS if declared.of_customer
    ]
    statement = (
        "SELECT DISTINCT customer FROM (" + " UNION ".join(parts) + ") AS owners WHERE customer <> '' ORDER BY 1"
    )
    with engine.connect() as connection:
        return [str(customer) for customer in connection.execute(text(statement)).scalars()]


def local_rows(connection: Connection, declared: StripeObject) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each row of the object here: id -> (its customer, the compared fields by label)."""
    rows = connection.execute(text(declared.local_sql)).mappings()
    return {row["id"]: (row["customer"], {label: row[label] for label in declared.compared}) for row in rows}


def relink(connection: Connection, fix: bool) -> list[tuple[str, str]]:
    """(link, customer) for each user or organization ('user_id', 'organization_id') no customer
    holds while an unlinked customer names it; with fix, each linked to the newest such customer
    (as a deletion or a moved link would)."""
    statement = text("SELECT link || '_id', stripe_customer_id FROM public.stripe_relink(:fix)")
    return [(row[0], row[1]) for row in connection.execute(statement, {"fix": fix})]


def recent_livemodes(connection: Connection) -> set[bool]:
    """The modes of the newest applied events (through the status index): the database's mode."""
    statement = text(
        "SELECT DISTINCT livemode FROM (SELECT livemode FROM public.stripe_webhook_events "
        "WHERE status = 'processed' ORDER BY received_at DESC LIMIT 100) AS recent"
    )
    return set(connection.execute(statement).scalars())


def customer_of_user(connection: Connection, user_id: str) -> str | None:
    """The user's Stripe customer (the commands and the console ask alike)."""
    statement = text("SELECT stripe_customer_id FROM public.stripe_customers WHERE user_id = :user_id")
    return connection.execute(statement, {"user_id": user_id}).scalar_one_or_none()


def user(connection: Connection, user_id: str) -> dict[str, Any] | None:
    """The auth.users row (id, email), if there is one."""
    row = connection.execute(text("SELECT id, email FROM auth.users WHERE id = :id"), {"id": user_id}).first()
    return None if row is None else dict(row._mapping)


_SETTINGS = text(
    """
    WITH wanted (name, value) AS (VALUES ('past_due_grace', CAST(:grace AS text))),
    cleared AS (DELETE FROM public.stripe_settings s USING wanted w WHERE s.name = w.name AND w.value IS NULL)
    INSERT INTO public.stripe_settings AS s (name, value)
    SELECT name, value FROM wanted WHERE value IS NOT NULL
    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
      WHERE s.value IS DISTINCT FROM EXCLUDED.value
    """
)


def write_settings(connection: Connection, grace_seconds: int | None) -> None:
    """The settings SQL reads (db/access.sql's stripe_settings): STRIPE_PAST_DUE_GRACE, or none.
    One statement, written again at each migrate and each start."""
    connection.execute(_SETTINGS, {"grace": None if grace_seconds is None else str(grace_seconds)})
    connection.commit()
