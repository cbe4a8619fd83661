"""The tables (docs/reference.md): the migration is idempotent and reversible, and the tables are as promised."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from bench import cluster
from tests.support import SECRET, add_user, cli, count, deliver, settings_for
from tests.test_rls import TABLES
from webhook import database, migrations, samples, store
from webhook.app import create_app
from webhook.config import Keys
from webhook.embedded import pg_bin
from webhook.results import Applied, Status
from webhook.signature import parse_event


def _indexes(engine: Engine, table: str) -> dict[str, str]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = :t"),
            {"t": table},
        ).all()
    return {row.indexname: row.indexdef for row in rows}


_SHAPE_OF_EVERYTHING = """
    SELECT 'index ' || indexrelid::regclass || ': ' || pg_get_indexdef(indexrelid) || ' valid=' || indisvalid
    FROM pg_index WHERE indrelid::regclass::text LIKE 'stripe\\_%%'
    UNION ALL
    SELECT 'constraint ' || conrelid::regclass || '.' || conname || ': ' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE conrelid::regclass::text LIKE 'stripe\\_%%'
    UNION ALL
    SELECT 'trigger ' || tgrelid::regclass || '.' || tgname FROM pg_trigger
    WHERE NOT tgisinternal AND tgrelid::regclass::text LIKE 'stripe\\_%%'
    UNION ALL
    SELECT 'function ' || oid::regprocedure || ': ' || md5(prosrc) FROM pg_proc WHERE proname LIKE 'stripe\\_%%'
    ORDER BY 1
"""


def test_schema_applies_twice(engine: Engine) -> None:
    """Every table's indexes, constraints and triggers, and every function, the same after two more
    migrates: nothing duplicated, nothing rebuilt or lost."""
    with engine.connect() as connection:
        before = connection.exec_driver_sql(_SHAPE_OF_EVERYTHING).scalars().all()
    migrations.migrate(engine, shim=True)
    migrations.migrate(engine, shim=False)
    with engine.connect() as connection:
        after = connection.exec_driver_sql(_SHAPE_OF_EVERYTHING).scalars().all()
    assert len(before) > 60 and any(line.startswith("index stripe_thin_waiting") for line in before)
    assert after == before


def test_rollback_then_migrate_again(scratch_url: str) -> None:
    scratch = database.make_engine(scratch_url, pool_size=1)
    migrations.migrate(scratch, shim=False)
    migrations.rollback(scratch)
    assert count(scratch, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'stripe_%'") == 0
    assert count(scratch, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'stripe_%'") == 0
    migrations.rollback(scratch)  # idempotent too
    migrations.migrate(scratch, shim=False)
    assert count(scratch, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'stripe_%'") == len(TABLES)
    scratch.dispose()


def test_no_duplicate_indexes_and_an_email_index(engine: Engine) -> None:
    indexes = _indexes(engine, "stripe_customers")
    columns = [definition.split(" USING btree ")[1] for definition in indexes.values()]
    assert len(columns) == len(set(columns)), indexes
    assert sorted(columns) == sorted(
        [
            "(id)",
            "(stripe_customer_id)",
            "(user_id)",
            "(organization_id)",
            "(lower(customer_email))",
        ]
    )


def test_seed_table_is_upgraded(scratch_url: str) -> None:
    engine = database.make_engine(scratch_url, pool_size=1)
    # A database that followed the original design note: NOT NULL email and three extra indexes.
    with engine.connect() as connection:
        connection.execute(
            text(
                """
                CREATE TABLE stripe_customers (
                  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
                  user_id UUID REFERENCES auth.users(id) ON DELETE CASCADE,
                  stripe_customer_id TEXT UNIQUE NOT NULL,
                  customer_email TEXT NOT NULL,
                  customer_name TEXT,
                  default_payment_method TEXT,
                  customer_metadata JSONB DEFAULT '{}',
                  created_at TIMESTAMPTZ DEFAULT NOW(),
                  updated_at TIMESTAMPTZ DEFAULT NOW(),
                  CONSTRAINT unique_user_customer UNIQUE(user_id),
                  CONSTRAINT valid_stripe_id CHECK (stripe_customer_id ~ '^cus_[a-zA-Z0-9]+$')
                );
                CREATE INDEX idx_stripe_customers_user_id ON stripe_customers(user_id);
                CREATE INDEX idx_stripe_customers_stripe_id ON stripe_customers(stripe_customer_id);
                CREATE INDEX idx_stripe_customers_email ON stripe_customers(customer_email);
                """
            )
        )
    migrations.migrate(engine, shim=False)
    assert not any(name.startswith("idx_") for name in _indexes(engine, "stripe_customers"))
    assert (
        count(
            engine,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'stripe_customers' "
            "AND column_name = 'customer_email' AND is_nullable = 'YES'",
        )
        == 1
    )
    engine.dispose()


def test_constraints_hold(engine: Engine) -> None:
    user_id = add_user(engine)
    with engine.connect() as connection:
        connection.execute(
            text("INSERT INTO stripe_customers (stripe_customer_id, user_id) VALUES ('cus_A1', :u)"), {"u": user_id}
        )
        for statement, params in [
            ("INSERT INTO stripe_customers (stripe_customer_id) VALUES ('cus_A1')", {}),
            ("INSERT INTO stripe_customers (stripe_customer_id, user_id) VALUES ('cus_B2', :u)", {"u": user_id}),
            ("INSERT INTO stripe_customers (stripe_customer_id) VALUES ('acct_123')", {}),
            (
                "INSERT INTO stripe_webhook_events (id, type, created, payload, status) "
                "VALUES ('evt_1', 't', now(), '{}', 'done')",
                {},
            ),
        ]:
            try:
                connection.execute(text(statement), params)
            except Exception as error:  # noqa: BLE001 - any refusal by the database will do
                assert "violates" in str(error), statement
            else:
                raise AssertionError(f"accepted: {statement}")
    # Deleting the auth user removes the link row, as the design note's CASCADE says.
    with engine.connect() as connection:
        connection.execute(text("DELETE FROM auth.users WHERE id = :u"), {"u": user_id})
    assert count(engine, "SELECT count(*) FROM stripe_customers") == 0
    assert count(engine, "SELECT count(*) FROM stripe_customers_audit WHERE operation = 'DELETE'") == 1


def test_the_events_customer_column_is_added_and_filled_keeping_every_row(scratch_url: str) -> None:
    """A log from before the column: customer events, a checkout naming its customer, an invoice with
    an expanded customer, and an event about no customer; more rows than one fill batch."""
    engine = database.make_engine(scratch_url, pool_size=1)
    migrations.migrate(engine, shim=False)
    with engine.connect() as connection:
        connection.execute(text("ALTER TABLE stripe_webhook_events DROP COLUMN stripe_customer_id"))
        connection.execute(
            text(
                "INSERT INTO stripe_webhook_events (id, type, created, payload, status) "
                "SELECT 'evt_' || n, kind, now(), jsonb_build_object('type', kind, 'data', jsonb_build_object("
                "'object', CASE kind WHEN 'customer.updated' THEN jsonb_build_object('id', 'cus_' || n) "
                "WHEN 'checkout.session.completed' THEN jsonb_build_object('customer', 'cus_' || n) "
                "WHEN 'invoice.paid' THEN jsonb_build_object('customer', jsonb_build_object('id', 'cus_' || n)) "
                "ELSE '{}'::jsonb END)), 'processed' "
                "FROM generate_series(1, 12000) AS n, LATERAL (SELECT (ARRAY['customer.updated', "
                "'checkout.session.completed', 'invoice.paid', 'balance.available'])[n % 4 + 1] AS kind) AS k"
            )
        )
    migrations.migrate(engine, shim=False)
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == 12000
    assert (
        count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE stripe_customer_id = 'cus_' || substr(id, 5)")
        == 9000
    )
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE stripe_customer_id IS NULL") == 3000
    assert "stripe_webhook_events_customer_idx" in _indexes(engine, "stripe_webhook_events")
    engine.dispose()


SYSTEM_POSTGRES = Path("/usr/lib/postgresql/15/bin")


@pytest.mark.skipif(
    not (SYSTEM_POSTGRES / "initdb").exists(), reason="no Debian PostgreSQL 15 (apt-get install postgresql-15)"
)
def test_large_values_use_lz4_where_the_server_has_it(engine: Engine) -> None:
    # The embedded server is built without lz4 (the suite's migrations show it keeps pglz); Debian's
    # and Supabase's have it.
    with engine.connect() as connection:
        assert connection.execute(text("SHOW default_toast_compression")).scalar_one() == "pglz"
    system = database.make_engine(cluster.start(SYSTEM_POSTGRES), pool_size=1)
    migrations.migrate(system, shim=True)
    migrations.migrate(system, shim=False)  # nothing left to change: no lock wanted
    assert count(system, "SELECT count(*) FROM pg_attribute WHERE attcompression = 'l'") == 3
    body = json.dumps(samples.event("customer.updated", samples.customer(metadata={"notes": "x" * 3000})))
    connection = system.raw_connection()
    try:
        store.apply_events(connection, [store.EventToApply(parse_event(body).payload, None, "webhook")])
    finally:
        connection.close()
    assert count(system, "SELECT count(*) FROM stripe_webhook_events WHERE pg_column_compression(payload) = 'lz4'") == 1
    system.dispose()


# The seed's first draft: no customer_name, no UNIQUE constraints, no primary key, NOT NULL email.
FIRST_DRAFT = """
CREATE TABLE stripe_customers (
  id UUID DEFAULT gen_random_uuid(),
  user_id UUID REFERENCES auth.users(id) ON DELETE CASCADE,
  stripe_customer_id TEXT NOT NULL,
  customer_email TEXT NOT NULL,
  default_payment_method TEXT,
  customer_metadata JSONB DEFAULT '{}',
  created_at TIMESTAMPTZ DEFAULT NOW()
);
INSERT INTO stripe_customers (stripe_customer_id, customer_email) VALUES ('cus_Kept1', 'kept@example.com');
"""


def _migrate_cli(url: str) -> Any:
    return cli("db", "migrate", DATABASE_URL=url, STRIPE_WEBHOOK_SECRET=SECRET)


def test_a_table_of_another_shape_is_brought_to_shape_keeping_its_rows(scratch_url: str) -> None:
    scratch = database.make_engine(scratch_url, pool_size=1)
    with scratch.connect() as connection:
        database.run_sql(connection, FIRST_DRAFT)
    migrated = _migrate_cli(scratch_url)
    assert migrated.returncode == 0, migrated.stderr
    assert count(scratch, "SELECT count(*) FROM stripe_customers WHERE stripe_customer_id = 'cus_Kept1'") == 1
    # The consumer can now write it: the kept row updated, a new one inserted, a second row for
    # one customer refused by the added UNIQUE constraint.
    customer = samples.customer("cus_Kept1", name="Now Named")
    for event in (samples.event("customer.updated", customer), samples.event("customer.created", samples.customer())):
        assert _apply(scratch, event) == Applied(Status.PROCESSED)
    with scratch.connect() as connection:
        assert (
            connection.execute(
                text("SELECT customer_name FROM stripe_customers WHERE stripe_customer_id = 'cus_Kept1'")
            ).scalar_one()
            == "Now Named"
        )
    with pytest.raises(DBAPIError, match="stripe_customers_stripe_customer_id_key"), scratch.connect() as connection:
        connection.execute(text("INSERT INTO stripe_customers (stripe_customer_id) VALUES ('cus_Kept1')"))
    scratch.dispose()


@pytest.mark.parametrize(
    ("table", "refusal"),
    [
        (
            "CREATE TABLE stripe_customers (id uuid PRIMARY KEY, stripe_customer_id text, customer_email integer)",
            "column customer_email is integer, expected text",
        ),
        (
            "CREATE TABLE stripe_customers (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid)",
            "column stripe_customer_id is missing",
        ),
        (
            FIRST_DRAFT
            + "INSERT INTO stripe_customers (stripe_customer_id, customer_email) VALUES ('cus_Kept1', 'b@x.com');",
            "stripe_customer_id is not unique and rows share it (cus_Kept1)",
        ),
    ],
)
def test_a_table_that_cannot_be_brought_to_shape_is_refused(scratch_url: str, table: str, refusal: str) -> None:
    scratch = database.make_engine(scratch_url, pool_size=1)
    with scratch.connect() as connection:
        database.run_sql(connection, table)
    refused = _migrate_cli(scratch_url)
    assert refused.returncode == 1 and refusal in refused.stderr, refused.stderr
    # Nothing of the consumer was applied, and the table is as it was.
    assert count(scratch, "SELECT count(*) FROM pg_tables WHERE tablename = 'stripe_webhook_events'") == 0
    scratch.dispose()


def _apply(engine: Engine, event: dict[str, Any]) -> Applied:
    from webhook import batch
    from webhook.objects import HANDLERS

    change = HANDLERS[event["type"]](event["data"]["object"], Keys())
    to_apply = store.EventToApply(json.dumps(event), None if change is None else change.as_json(), "webhook")
    return batch.batches(engine).apply(event["id"], to_apply)


def test_a_failed_step_is_named_the_steps_before_it_stay_and_a_rerun_finishes(scratch_url: str) -> None:
    scratch = database.make_engine(scratch_url, pool_size=1)
    with scratch.connect() as connection:  # a function of the consumer's name with another return type
        database.run_sql(
            connection, "CREATE FUNCTION public.stripe_customers_touch() RETURNS integer LANGUAGE sql AS 'SELECT 1'"
        )
    failed = _migrate_cli(scratch_url)
    assert failed.returncode == 1
    assert "functions.sql, step 'functions and triggers'" in failed.stderr and "run db migrate again" in failed.stderr
    # schema.sql's steps, before it, stay applied; nothing of the failed step does.
    assert count(scratch, "SELECT count(*) FROM pg_tables WHERE tablename = 'stripe_customers_audit'") == 1
    assert count(scratch, "SELECT count(*) FROM pg_proc WHERE proname = 'stripe_apply_batch'") == 0
    with scratch.connect() as connection:
        connection.execute(text("DROP FUNCTION public.stripe_customers_touch()"))
    rerun = _migrate_cli(scratch_url)
    assert rerun.returncode == 0, rerun.stderr
    assert count(scratch, "SELECT count(*) FROM pg_proc WHERE proname = 'stripe_apply_batch'") == 1
    scratch.dispose()


def test_the_previous_releases_batch_call_still_answers_in_its_text_form(engine: Engine) -> None:
    """During a deploy the old release calls stripe_apply_events and splits text outcomes."""
    ignored = samples.event("invoice.paid", {"id": "in_1", "customer": "cus_Old1"})
    broken = '{"id": "evt_broken", "type": "customer.updated", "created": 1, "data": {"object": {}}, "x": "\\ud800"}'
    with engine.connect() as connection:
        outcomes = connection.execute(
            text(
                "SELECT public.stripe_apply_events("
                "CAST(:events AS text[]), ARRAY[NULL, NULL], ARRAY['webhook', 'webhook'], NULL)"
            ),
            {"events": [json.dumps(ignored), broken]},
        ).scalar_one()
    assert outcomes[0] == "ignored"
    assert outcomes[1].startswith("error:22P02:")  # jsonb refuses the lone surrogate: that event alone


def test_db_sql_applied_by_psql_in_one_transaction_leaves_migrate_nothing_to_do(
    scratch_url: str, tmp_path: Path
) -> None:
    """A team that keeps the schema in its own migrations (supabase/migrations, Alembic, Flyway):
    `db sql` prints it, their tool applies it in one transaction, and the consumer serves."""
    printed = cli("db", "sql")
    assert printed.returncode == 0, printed.stderr
    migration = tmp_path / "20261207000000_stripe_webhook.sql"
    migration.write_text(printed.stdout)
    libpq_url = scratch_url.replace("postgresql+psycopg2://", "postgresql://")
    applied = subprocess.run(
        [
            pg_bin("psql"),
            "--no-psqlrc",
            "-v",
            "ON_ERROR_STOP=1",
            "--single-transaction",
            "-q",
            "-f",
            str(migration),
            libpq_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert applied.returncode == 0, applied.stderr
    scratch = database.make_engine(scratch_url, pool_size=1)
    with scratch.connect() as connection:
        before = connection.exec_driver_sql(_SHAPE_OF_EVERYTHING).scalars().all()
    assert len(before) > 60
    migrated = cli("db", "migrate", DATABASE_URL=scratch_url, STRIPE_WEBHOOK_SECRET=SECRET)
    assert migrated.returncode == 0, migrated.stderr
    with scratch.connect() as connection:
        assert connection.exec_driver_sql(_SHAPE_OF_EVERYTHING).scalars().all() == before
    client = create_app(settings_for(scratch_url), scratch).test_client()
    answer = deliver(client, samples.event("customer.created", samples.customer()))
    assert (answer.status_code, answer.get_json()["status"]) == (200, "processed")
    scratch.dispose()


def test_every_index_is_built_beside_traffic() -> None:
    """How each index is built, read from the migration itself: CONCURRENTLY (writes go on), in a
    step of its own (CONCURRENTLY cannot share a transaction), so a table of millions of rows never
    blocks a delivery while migrate runs. (tests/test_live_migration.py measures it, -m reliability.)"""
    built = 0
    for path in migrations.APPLIED:
        for step in migrations.steps(path):
            code = "\n".join(line.split("--")[0] for line in step.sql.splitlines())  # comments out
            for statement in re.findall(r"(?<!')CREATE (?:UNIQUE )?INDEX[^;]*;", code):  # not in a message
                built += 1
                assert "CONCURRENTLY IF NOT EXISTS" in statement, (path.name, step.title, statement)
                assert code.count(";") == 1, (path.name, step.title)  # alone in its step
    assert built >= 8


def test_the_previous_releases_shapes_move_into_one_keeping_every_row(scratch_url: str) -> None:
    """Tombstones, audit rows and sync stamps kept apart by the release before move into the one
    tombstone table, the one audit and <object>_metadata.sync; the old shapes go, the move itself
    is audited as no change, and the moved stamps and tombstones still order events."""
    from tests.support import PREVIOUS_SHAPES

    scratch = database.make_engine(scratch_url, pool_size=1)
    migrations.migrate(scratch, shim=False)
    with scratch.connect() as connection:
        database.run_sql(connection, PREVIOUS_SHAPES)
    audited = count(scratch, "SELECT coalesce(max(id), 0) FROM stripe_customers_audit")  # the rows made above
    migrated = _migrate_cli(scratch_url)
    assert migrated.returncode == 0, migrated.stderr
    with scratch.connect() as connection:
        tombstones = connection.execute(text("SELECT object, stripe_id, event_created FROM stripe_object_tombstones"))
        assert tombstones.all() == [("customer", "cus_GoneBefore", 1700000100)]
        audit = connection.execute(
            text(
                "SELECT object, stripe_id, stripe_customer_id, event_id FROM stripe_customers_audit "
                "WHERE id > :audited ORDER BY id"
            ),
            {"audited": audited},
        )
        assert audit.all() == [
            ("subscription", "sub_Before", "cus_Before", "evt_sub"),
            ("payment_method", "pm_Before", "cus_Before", "evt_pm"),
        ]
        stamps = connection.execute(
            text(
                "SELECT payment_method_metadata #>> '{sync,event_created}' FROM stripe_payment_methods UNION ALL "
                "SELECT entitlements_metadata #>> '{sync,event_created}' FROM stripe_entitlement_sets"
            )
        )
        assert stamps.scalars().all() == ["1700000200", "1700000300"]
        left = connection.execute(
            text(
                "SELECT to_regclass('stripe_customer_tombstones'), to_regclass('stripe_billing_audit'), "
                "(SELECT count(*) FROM pg_attribute WHERE attname = 'sync' AND NOT attisdropped AND attrelid IN "
                "('stripe_payment_methods'::regclass, 'stripe_entitlement_sets'::regclass))"
            )
        )
        assert left.one() == (None, None, 0)
    older = samples.event("customer.created", samples.customer("cus_GoneBefore"), created=1700000050)
    method = {**samples.payment_method("cus_Before"), "id": "pm_Before"}
    updated = samples.event("payment_method.updated", method, created=1700000150)
    assert [_apply(scratch, event) for event in (older, updated)] == [Applied(Status.STALE)] * 2
    scratch.dispose()


PREVIOUS_RELEASE = "a25fded"  # the last commit before the one shape (db/one_shape.sql)


def _through_sql(engine: Engine, *events: dict[str, Any]) -> list[str]:
    """Events applied by the database's own stripe_apply_batch: the previous release's, or this one's."""
    from webhook.objects import HANDLERS

    changes = [HANDLERS[event["type"]](event["data"]["object"], Keys()) for event in events]
    with engine.begin() as connection:
        rows = connection.execute(
            text(
                "SELECT status FROM public.stripe_apply_batch(CAST(:events AS text[]), CAST(:changes AS text[]), "
                "CAST(:sources AS text[]), NULL)"
            ),
            {
                "events": [json.dumps(event) for event in events],
                "changes": [None if change is None else json.dumps(change.as_json()) for change in changes],
                "sources": ["webhook"] * len(events),
            },
        )
        return [str(status) for status in rows.scalars()]


def test_from_the_previous_release_and_back_keeping_every_row(scratch_url: str, tmp_path: Path) -> None:
    """The previous release's database moves into the one shape under `db migrate`, and
    `db rollback --to-previous-release` puts it back so that the previous release's own migrate
    and SQL run again: tombstones, audit rows and stamps survive both ways."""
    from bench.ab import worktree

    known = subprocess.run(["git", "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"this checkout has no history back to {PREVIOUS_RELEASE}")
    scratch = database.make_engine(scratch_url, pool_size=1)
    customer = samples.customer()
    method = samples.payment_method(customer["id"])
    subscription = samples.subscription(customer["id"], status="active")
    with worktree(PREVIOUS_RELEASE) as tree:
        env = {"PYTHONPATH": str(tree), "DATABASE_URL": scratch_url, "STRIPE_WEBHOOK_SECRET": SECRET}

        def previous_migrate() -> None:
            done = subprocess.run(
                [sys.executable, "-m", "webhook", "db", "migrate"],
                env={**os.environ, **env},
                cwd=tree,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr

        previous_migrate()
        assert (
            _through_sql(
                scratch,
                samples.event("customer.created", customer, created=1_700_000_000),
                samples.event("customer.deleted", customer, created=1_700_000_010),
                samples.event("customer.subscription.created", subscription, created=1_700_000_020),
                samples.event("payment_method.attached", method, created=1_700_000_030),
            )
            == ["processed"] * 4
        )

        migrations.migrate(scratch, shim=False)
        with scratch.connect() as connection:
            assert (
                connection.execute(
                    text("SELECT event_created FROM stripe_object_tombstones WHERE stripe_id = :id"),
                    {"id": customer["id"]},
                ).scalar_one()
                == 1_700_000_010
            )
            assert (
                connection.execute(
                    text(
                        "SELECT count(*) FROM stripe_customers_audit WHERE object = 'subscription' AND stripe_id = :id"
                    ),
                    {"id": subscription["id"]},
                ).scalar_one()
                == 1
            )
        older = [
            samples.event("customer.updated", customer, created=1_700_000_005),
            samples.event("payment_method.updated", method, created=1_700_000_025),
        ]
        assert _through_sql(scratch, *older) == ["stale", "stale"]

        back = cli("db", "rollback", "--to-previous-release", DATABASE_URL=scratch_url, STRIPE_WEBHOOK_SECRET=SECRET)
        assert back.returncode == 0, back.stderr
        previous_migrate()
        again = [{**event, "id": event["id"] + "x"} for event in older]  # new ids: not duplicates
        newer = samples.event(
            "payment_method.updated", {**method, "card": {**method["card"], "last4": "0005"}}, created=1_700_000_040
        )
        assert _through_sql(scratch, *again, newer) == ["stale", "stale", "processed"]
        with scratch.connect() as connection:
            assert (
                connection.execute(
                    text("SELECT count(*) FROM stripe_billing_audit WHERE stripe_id = :id"), {"id": subscription["id"]}
                ).scalar_one()
                == 1
            )
            assert (
                connection.execute(
                    text("SELECT sync ->> 'event_created' FROM stripe_payment_methods WHERE stripe_customer_id = :id"),
                    {"id": customer["id"]},
                ).scalar_one()
                == "1700000040"
            )
    scratch.dispose()
