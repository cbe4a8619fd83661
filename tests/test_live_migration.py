"""`db migrate` while the consumer takes deliveries, as the Procfile's release step runs it."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from tests.server import gunicorn, post_event
from tests.support import PREVIOUS_SHAPES, SECRET, cli
from webhook import database, migrations, samples


def _migrate(database_url: str) -> subprocess.CompletedProcess[str]:
    return cli("db", "migrate", DATABASE_URL=database_url, STRIPE_WEBHOOK_SECRET=SECRET)


TABLES = "stripe_customers, stripe_webhook_events, stripe_customers_audit, stripe_object_tombstones"


def test_a_migrate_that_changes_nothing_takes_no_strong_lock(database_url: str, engine: Engine) -> None:
    # What deliveries hold (ROW EXCLUSIVE) and what a reader left idle in its transaction holds:
    # any lock a migration could want beyond reading the catalog conflicts with these.
    with engine.connect() as holder:
        holder = holder.execution_options(isolation_level="READ COMMITTED")
        transaction = holder.begin()
        holder.execute(text(f"LOCK TABLE {TABLES}, stripe_customer_claims IN ROW EXCLUSIVE MODE"))
        started = time.monotonic()
        migrated = _migrate(database_url)
        took = time.monotonic() - started
        transaction.rollback()
    assert migrated.returncode == 0, migrated.stderr
    assert "waited for a lock" not in migrated.stderr
    print(f"\nup-to-date migrate beside held ROW EXCLUSIVE locks: {took:.1f} s")


def _traffic(port: int, stop: threading.Event) -> tuple[Counter[int], float]:
    statuses: Counter[int] = Counter()
    slowest = 0.0
    while not stop.is_set():
        started = time.monotonic()
        status, _ = post_event(port, samples.event("customer.created", samples.customer()), timeout=30)
        slowest = max(slowest, time.monotonic() - started)
        statuses[status] += 1
    return statuses, slowest


@pytest.fixture(autouse=True)
def schema_restored(engine: Engine) -> Iterator[None]:
    """These tests take parts of the shared schema away; it is whole again after each, pass or fail."""
    yield
    migrations.migrate(engine, shim=False)


def _undo_some_of_the_schema(engine: Engine) -> None:
    """What a release that adds an index, a policy and row level security has to do, and one that
    moves the previous release's shapes into one (tests/support.py, PREVIOUS_SHAPES)."""
    with engine.begin() as connection:
        database.run_sql(connection, PREVIOUS_SHAPES)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX stripe_customers_email_lower_idx"))
        connection.execute(text('DROP POLICY "Users can view own customer data" ON stripe_customers'))
        connection.execute(text("ALTER TABLE stripe_customer_claims DISABLE ROW LEVEL SECURITY"))


@pytest.mark.reliability  # slow (a long wait by design): beside the soak, not in the default run
def test_migrations_beside_live_traffic_fail_no_delivery(database_url: str, engine: Engine) -> None:
    stop = threading.Event()
    runs = []
    with gunicorn(database_url, workers=2) as (port, _), ThreadPoolExecutor(max_workers=8) as pool:
        clients = [pool.submit(_traffic, port, stop) for _ in range(8)]
        time.sleep(1)
        for changes in (False, True, False, True):
            if changes:
                _undo_some_of_the_schema(engine)
            runs.append(_migrate(database_url))
        # A reader left idle in its transaction while the migrate needs a strong lock: the migrate
        # retries rather than queue every delivery behind it, and finishes once the reader is gone.
        _undo_some_of_the_schema(engine)
        reading = threading.Event()

        def idle_reader() -> None:
            with engine.connect() as reader:
                reader = reader.execution_options(isolation_level="READ COMMITTED")
                with reader.begin():
                    reader.execute(text("SELECT count(*) FROM stripe_customers"))
                    reading.set()
                    time.sleep(4)  # idle in its transaction, holding its lock; then it ends

        holder = threading.Thread(target=idle_reader)
        holder.start()
        assert reading.wait(10)
        runs.append(_migrate(database_url))
        holder.join()
        stop.set()
        results = [client.result() for client in clients]
    statuses = sum((counted for counted, _ in results), Counter())
    slowest = max(longest for _, longest in results)
    print(f"\n5 migrations beside 8 clients: {dict(statuses)}, slowest delivery {slowest:.2f} s")
    assert [run.returncode for run in runs] == [0] * 5, [run.stderr for run in runs]
    assert "waited for a lock" in runs[-1].stderr
    # What the README promises: no delivery fails, and none waits much more than the migration's
    # one-second lock timeout.
    assert set(statuses) == {200} and statuses[200] > 100
    assert slowest < 1.5
    with engine.connect() as connection:
        assert connection.execute(
            text(
                "SELECT count(*) FROM pg_policies WHERE tablename = 'stripe_customers'"
                " AND policyname = 'Users can view own customer data'"
            )
        ).scalar_one()
        assert connection.execute(
            text("SELECT relrowsecurity FROM pg_class WHERE oid = 'stripe_customer_claims'::regclass")
        ).scalar_one()
        assert connection.execute(
            text("SELECT indisvalid FROM pg_index WHERE indexrelid = 'stripe_customers_email_lower_idx'::regclass")
        ).scalar_one()
        moved = "SELECT count(*) FROM stripe_object_tombstones WHERE stripe_id = 'cus_GoneBefore'"
        assert connection.execute(text(moved)).scalar_one() == 1
        assert connection.execute(text("SELECT to_regclass('stripe_billing_audit')")).scalar_one() is None


def test_an_index_build_interrupted_earlier_is_built_again(database_url: str, engine: Engine) -> None:
    # A failed CREATE INDEX CONCURRENTLY leaves an invalid index of that name; IF NOT EXISTS alone
    # would keep it for ever. Here a unique build over a duplicated email fails half-way.
    valid = text("SELECT indisvalid FROM pg_index WHERE indexrelid = 'stripe_customers_email_lower_idx'::regclass")
    with engine.connect() as connection:
        connection.execute(text("DROP INDEX stripe_customers_email_lower_idx"))
        connection.execute(
            text(
                "INSERT INTO stripe_customers (stripe_customer_id, customer_email) "
                "VALUES ('cus_A', 'x@example.com'), ('cus_B', 'x@example.com')"
            )
        )
        with pytest.raises(DBAPIError):
            connection.execute(
                text(
                    "CREATE UNIQUE INDEX CONCURRENTLY stripe_customers_email_lower_idx "
                    "ON stripe_customers (lower(customer_email))"
                )
            )
        assert connection.execute(valid).scalar_one() is False
    assert _migrate(database_url).returncode == 0
    with engine.connect() as connection:
        assert connection.execute(valid).scalar_one() is True
