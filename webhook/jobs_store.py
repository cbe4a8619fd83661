"""The SQL of the background jobs (backfill, heal, prune): where a job got to, which heal process
holds the lease, what its last round found, and pruning the event log. The hot path's statements
stay in store.py."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, text


class Cursor(StrEnum):
    """Every row of stripe_sync_cursors, named once."""

    BACKFILL = "backfill"  # backfill:<object>: the last one a stopped backfill wrote; the next run resumes after it
    HEAL_EVENTS = "heal_events"  # where heal's last recovery round started (unix seconds)
    HEAL_LEASE = "heal_lease"  # which heal process works now (the lease, renewed during a round)
    HEAL_STATE = "heal_state"  # JSON: when heal's rounds ran and what the last one found (for /metrics)


def saved_cursor(engine: Engine, name: str) -> str | None:
    with engine.connect() as connection:
        found = connection.execute(
            text("SELECT value FROM stripe_sync_cursors WHERE name = :name"), {"name": name}
        ).scalar_one_or_none()
    return None if found is None else str(found)


def save_cursor(engine: Engine, name: str, value: str | None) -> None:
    """Remember where a job got to (or, as JSON, what it found); None forgets it."""
    with engine.connect() as connection:
        if value is None:
            connection.execute(text("DELETE FROM stripe_sync_cursors WHERE name = :name"), {"name": name})
            return
        connection.execute(
            text(
                "INSERT INTO stripe_sync_cursors (name, value) VALUES (:name, :value) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
            ),
            {"name": name, "value": value},
        )


def saved_json(engine: Engine, name: Cursor) -> dict[str, Any]:
    value = saved_cursor(engine, name)
    return dict(json.loads(value)) if value else {}


# One statement, so two processes asking at once cannot both get it (the row lock of ON CONFLICT
# serialises them, and the second sees the first's fresh lease); the database's clock for both
# sides, so hosts' clocks do not matter. No session state: fine behind a transaction-mode pooler.
_TAKE_LEASE = text(
    """
    INSERT INTO stripe_sync_cursors AS c (name, value) VALUES (:name, :holder)
    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
    WHERE c.value = EXCLUDED.value OR c.updated_at < now() - make_interval(secs => :seconds)
    RETURNING value
    """
)


def take_lease(engine: Engine, name: Cursor, holder: str, seconds: float) -> bool:
    """Take, or renew, the lease `name` for `seconds`; False while another holder's is live."""
    with engine.connect() as connection:
        taken = connection.execute(_TAKE_LEASE, {"name": name, "holder": holder, "seconds": seconds})
        return taken.first() is not None


def release_lease(engine: Engine, name: Cursor, holder: str) -> None:
    with engine.connect() as connection:
        connection.execute(
            text("DELETE FROM stripe_sync_cursors WHERE name = :name AND value = :holder"),
            {"name": name, "holder": holder},
        )


_PRUNABLE = "status IN ('processed', 'ignored', 'stale') AND received_at < to_timestamp(:cutoff)"


def count_prunable(engine: Engine, cutoff: int) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(f"SELECT count(*) FROM stripe_webhook_events WHERE {_PRUNABLE}"), {"cutoff": cutoff}
            ).scalar_one()
        )


def prune_batch(engine: Engine, cutoff: int, size: int) -> int:
    """Delete up to `size` settled events received before `cutoff` (unix seconds), in one short
    transaction (the status index finds them); the number deleted. Tombstones are another table."""
    with engine.connect() as connection:
        deleted = connection.execute(
            text(
                "DELETE FROM stripe_webhook_events WHERE id IN "
                f"(SELECT id FROM stripe_webhook_events WHERE {_PRUNABLE} LIMIT :size)"
            ),
            {"cutoff": cutoff, "size": size},
        )
        return int(deleted.rowcount)


def log_health(engine: Engine) -> dict[str, float | None]:
    """For /metrics: failed events waiting, the oldest one's age, and the newest processed event's
    receipt (each an index scan on (status, received_at)); thin notifications waiting for their
    read, and when the first of them arrived (a small table: one row per object)."""
    with engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT (SELECT count(*) FROM stripe_webhook_events WHERE status = 'failed'), "
                "(SELECT extract(epoch FROM min(received_at)) FROM stripe_webhook_events WHERE status = 'failed'), "
                "(SELECT extract(epoch FROM max(received_at)) FROM stripe_webhook_events WHERE status = 'processed'), "
                "(SELECT sum(cardinality(event_ids)) FROM stripe_thin_waiting), "
                "(SELECT extract(epoch FROM min(first_at)) FROM stripe_thin_waiting)"
            )
        ).one()
    return {
        "failed": float(row[0]),
        "oldest_failed": None if row[1] is None else float(row[1]),
        "last_processed": None if row[2] is None else float(row[2]),
        "thin_waiting": float(row[3] or 0),
        "thin_first": None if row[4] is None else float(row[4]),
    }
