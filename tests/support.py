"""Helpers for the tests: real signatures, deliveries to the real app, and row lookups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import stripe
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from webhook.budget import Budget
from webhook.config import Settings, load_settings
from webhook.thin_queue import Reader

SECRET = "whsec_test_primary_0123456789abcdef"
SECOND_SECRET = "whsec_test_rotated_fedcba9876543210"


KEY = "sk_test_fake"  # the one API key the fake Stripe accepts


def settings_for(database_url: str, **overrides: str) -> Settings:
    env = {"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": f"{SECRET},{SECOND_SECRET}"}
    env.update(overrides)
    return load_settings(env)


def sign(body: str, secret: str = SECRET, timestamp: int | None = None) -> str:
    return str(stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=timestamp))


def deliver(client: FlaskClient, event: dict[str, Any] | str | bytes, **sign_args: Any) -> Any:
    """POST one delivery as Stripe does: the raw body, signed."""
    body = event if isinstance(event, str | bytes) else json.dumps(event)
    text_body = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return client.post(
        "/webhooks/stripe",
        data=body,
        headers={"Stripe-Signature": sign(text_body, **sign_args), "Content-Type": "application/json"},
    )


def add_user(engine: Engine, email: str | None = None) -> str:
    user_id = str(uuid.uuid4())
    with engine.connect() as connection:
        connection.execute(
            text("INSERT INTO auth.users (id, email) VALUES (:id, :email)"),
            {"id": user_id, "email": email or f"user-{user_id[:8]}@example.com"},
        )
    return user_id


def customer_row(engine: Engine, stripe_customer_id: str) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = (
            connection.execute(
                text("SELECT * FROM public.stripe_customers WHERE stripe_customer_id = :id"), {"id": stripe_customer_id}
            )
            .mappings()
            .first()
        )
    return None if row is None else dict(row)


def event_row(engine: Engine, event_id: str) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = (
            connection.execute(text("SELECT * FROM public.stripe_webhook_events WHERE id = :id"), {"id": event_id})
            .mappings()
            .first()
        )
    return None if row is None else dict(row)


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(sql), params).scalar_one())


def now() -> int:
    return int(time.time())


@contextmanager
def failing_writes(engine: Engine, table: str, when: str, condition: str = "true") -> Iterator[None]:
    """A trigger that raises 'injected failure' on INSERT into `table` (of rows meeting `condition`)
    while the block runs."""
    with engine.connect() as connection:
        connection.execute(
            text(
                f"""
                CREATE OR REPLACE FUNCTION public.test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE EXCEPTION 'injected failure'; END $$;
                CREATE TRIGGER test_refuse {when} INSERT ON {table} FOR EACH ROW WHEN ({condition})
                  EXECUTE FUNCTION public.test_refuse();
                """
            )
        )
    try:
        yield
    finally:
        with engine.connect() as connection:
            connection.execute(text(f"DROP TRIGGER test_refuse ON {table}"))


def audit_steps_backwards(engine: Engine) -> int:
    """How many audited changes, in commit order, moved a customer to an older event."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    """
                    SELECT count(*) FROM (
                      SELECT (new_row #>> '{customer_metadata,sync,event_created}')::bigint AS created,
                             lag((new_row #>> '{customer_metadata,sync,event_created}')::bigint)
                               OVER (PARTITION BY stripe_customer_id ORDER BY id) AS previous
                      FROM stripe_customers_audit) AS steps
                    WHERE created < previous
                    """
                )
            ).scalar_one()
        )


def configured(**env: str) -> dict[str, str]:
    """This process's environment without the consumer's configuration, plus `env`: a command run
    with it sees only what the test gives it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_") and k != "DATABASE_URL"}
    return {**base, **env}


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m webhook ARGS` as a subprocess (in `cwd`), with only the given configuration."""
    return subprocess.run(
        [sys.executable, "-m", "webhook", *args],
        env=configured(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def unlinked_by_hand_then_verified(
    engine: Engine, database_url: str, link: str, linked: dict[str, Any], waiting: dict[str, Any]
) -> None:
    """Take the link ('user' or 'organization') from the customer that holds it with the triggers
    off, as a change made outside the consumer would; then `verify` must report the customer that
    names it (`unlinked`), `verify --fix` link that one, and `verify` find nothing more."""
    from tests.fake_stripe import FakeStripe

    trigger = "stripe_customers_moved" if link == "user" else "stripe_customers_organization_moved"
    with engine.connect() as connection:
        connection.execute(text(f"ALTER TABLE stripe_customers DISABLE TRIGGER {trigger}"))
        try:
            connection.execute(
                text(f"UPDATE stripe_customers SET {link}_id = NULL WHERE stripe_customer_id = :id"),
                {"id": linked["id"]},
            )
        finally:
            connection.execute(text(f"ALTER TABLE stripe_customers ENABLE TRIGGER {trigger}"))
    fake = FakeStripe()
    for customer in (linked, waiting):
        fake.customers[customer["id"]] = customer
    with fake.serving() as base:
        env = {"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": SECRET, "STRIPE_API_BASE": base}
        found = cli("verify", **env, STRIPE_API_KEY="sk_test_fake")
        assert found.returncode == 1 and f"drift {waiting['id']}: unlinked ({link}_id differ)" in found.stdout
        fixed = cli("verify", "--fix", **env, STRIPE_API_KEY="sk_test_fake")
        assert fixed.returncode == 0, fixed.stderr
        assert cli("verify", **env, STRIPE_API_KEY="sk_test_fake").returncode == 0


def read_waiting(engine: Engine, settings: Settings) -> int:
    """Read and apply every thin notification due now, as a serve process' readers do; how many
    objects were read."""
    return Reader(engine, settings, Budget(engine, settings.stripe_api_rate)).drain()


def wait_for(condition: Callable[[], bool], seconds: float, every: float = 0.05) -> None:
    """Wait until condition() holds (another thread or process makes it so); fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(every)


def waiting_on_locks(engine: Engine) -> int:
    """How many backends wait for a lock now (another test's held transaction, say)."""
    return count(engine, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")


# What the release before 2026-12-07 kept in shapes of its own (db/one_shape.sql moves them): a
# customers' tombstone table, a billing audit, and a `sync` column on entitlement sets and payment
# methods, each with a row.
PREVIOUS_SHAPES = """
CREATE TABLE stripe_customer_tombstones (stripe_customer_id text PRIMARY KEY, event_id text,
  event_created bigint NOT NULL, deleted_at timestamptz NOT NULL DEFAULT now());
INSERT INTO stripe_customer_tombstones VALUES ('cus_GoneBefore', 'evt_gone', 1700000100, now());
CREATE TABLE stripe_billing_audit (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, object text NOT NULL,
  stripe_id text NOT NULL, stripe_customer_id text, operation text NOT NULL, old_row jsonb, new_row jsonb,
  event_id text, changed_by text NOT NULL DEFAULT current_user, changed_at timestamptz NOT NULL DEFAULT now());
INSERT INTO stripe_billing_audit (object, stripe_id, stripe_customer_id, operation, new_row, event_id)
VALUES ('subscription', 'sub_Before', 'cus_Before', 'INSERT', '{"status": "active"}', 'evt_sub'),
       ('payment_method', 'pm_Before', 'cus_Before', 'INSERT', '{"last4": "4242"}', 'evt_pm');
ALTER TABLE stripe_payment_methods ADD COLUMN sync jsonb NOT NULL DEFAULT '{}';
ALTER TABLE stripe_entitlement_sets ADD COLUMN sync jsonb NOT NULL DEFAULT '{}';
INSERT INTO stripe_payment_methods (stripe_payment_method_id, stripe_customer_id, type, sync)
VALUES ('pm_Before', 'cus_Before', 'card', '{"status": "synced", "event_id": "evt_pm", "event_created": 1700000200}')
ON CONFLICT (stripe_payment_method_id) DO UPDATE SET sync = EXCLUDED.sync;
INSERT INTO stripe_entitlement_sets (stripe_customer_id, sync)
VALUES ('cus_Before', '{"status": "synced", "event_id": "evt_ent", "event_created": 1700000300}')
ON CONFLICT (stripe_customer_id) DO UPDATE SET sync = EXCLUDED.sync;
"""
