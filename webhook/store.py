"""Every SQL statement the consumer runs, and the engine that runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url

DB_DIR = Path(__file__).resolve().parent.parent / "db"


def make_engine(database_url: str, pool_size: int) -> Engine:
    url = make_url(database_url).set(drivername="postgresql+psycopg2")
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,  # DB_POOL_SIZE is a promise to the database's connection limit
        pool_timeout=10,
        # Each event is one statement, so autocommit makes it one round trip and one transaction;
        # nothing outlives it, which is what a transaction-mode pooler needs.
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 5, "application_name": "stripe-webhook"},
    )


def run_sql_file(connection: Connection, path: Path) -> None:
    # Sent as one simple query: Postgres runs a multi-statement string as one implicit
    # transaction, so a migration that fails half-way leaves nothing behind.
    connection.exec_driver_sql(path.read_text())


_APPLY_EVENT = text("SELECT public.stripe_apply_event(CAST(:payload AS jsonb), CAST(:change AS jsonb), :source)")


def apply_event(connection: Connection, payload: str, change: dict[str, Any] | None, source: str) -> str:
    """Log, deduplicate and apply one event in one statement; returns the outcome's name."""
    change_json = None if change is None else json.dumps(change)
    result = connection.execute(_APPLY_EVENT, {"payload": payload, "change": change_json, "source": source})
    return str(result.scalar_one())


_RECORD_FAILURE = text(
    """
    INSERT INTO public.stripe_webhook_events AS e
      (id, type, api_version, livemode, created, payload, status, attempts, last_error)
    SELECT p ->> 'id', p ->> 'type', p ->> 'api_version', coalesce((p ->> 'livemode')::boolean, false),
           to_timestamp((p ->> 'created')::bigint), p, 'failed', 1, :error
    FROM (SELECT CAST(:payload AS jsonb) AS p) AS delivery
    ON CONFLICT (id) DO UPDATE SET status = 'failed', attempts = e.attempts + 1, last_error = EXCLUDED.last_error
      WHERE e.status IN ('received', 'failed')
    """
)


def record_failure(connection: Connection, payload: str, error: str) -> None:
    """Keep a failed event with its error so Stripe's retry or `replay` can run it again."""
    connection.execute(_RECORD_FAILURE, {"payload": payload, "error": error})


_SCHEMA_READY = text("SELECT to_regprocedure('public.stripe_apply_event(jsonb, jsonb, text)') IS NOT NULL")


def schema_ready(connection: Connection) -> bool:
    return bool(connection.execute(_SCHEMA_READY).scalar_one())
