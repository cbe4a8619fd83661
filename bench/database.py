"""The database-only figures of `bench.run`: the ceiling of stripe_apply_event under pgbench,
lookups on 1,000,000 rows, and the database work of a backfill."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from webhook import objects_store, samples
from webhook.objects.customer import state as customer_state
from webhook.results import Source


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def pgbench_ceiling(database_url: str, seconds: int) -> float | None:
    binary = shutil.which("pgbench")
    if binary is None:
        return None
    script = Path(tempfile.mkdtemp()) / "apply.sql"
    script.write_text(
        "\\set c random(1, 3000)\n"
        "SELECT public.stripe_apply_event(jsonb_build_object('id', 'evt_' || md5(random()::text), "
        "'type', 'customer.updated', 'created', extract(epoch from clock_timestamp())::bigint, "
        "'data', jsonb_build_object('object', jsonb_build_object('id', 'cus_bench' || :c, "
        "'notes', repeat('x', 2000)))), "
        "jsonb_build_object('action', 'upsert', 'id', 'cus_bench' || :c, 'email', 'c' || :c || '@example.com', "
        "'name', 'Customer', 'metadata', '{}'::jsonb), 'webhook');\n"
    )
    libpq = database_url.replace("postgresql+psycopg2://", "postgresql://", 1)
    result = subprocess.run(
        [binary, "-n", "-c", "8", "-j", "2", "-T", str(seconds), "-f", str(script), libpq],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in result.stdout.splitlines():
        if line.startswith("tps"):
            return float(line.split("=")[1].split()[0])
    return None


def lookups(engine: Engine, rows: int, samples_per_kind: int) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        connection.execute(text("ALTER TABLE stripe_customers DISABLE TRIGGER USER"))
        connection.execute(
            text(
                f"""
            INSERT INTO auth.users (id, email)
            SELECT md5('u' || n)::uuid, 'user' || n || '@example.com' FROM generate_series(1, {rows}) AS n;
            INSERT INTO stripe_customers (user_id, stripe_customer_id, customer_email, customer_name)
            SELECT md5('u' || n)::uuid, 'cus_L' || n, 'User' || n || '@Example.com', 'User ' || n
            FROM generate_series(1, {rows}) AS n;
            ANALYZE stripe_customers;
            """
            )
        )
        connection.execute(text("ALTER TABLE stripe_customers ENABLE TRIGGER USER"))
    queries = {
        "user_id": (
            "SELECT stripe_customer_id FROM stripe_customers WHERE user_id = :v",
            lambda n: str(uuid.UUID(hashlib.md5(f"u{n}".encode()).hexdigest())),
        ),
        "stripe_customer_id": (
            "SELECT user_id FROM stripe_customers WHERE stripe_customer_id = :v",
            lambda n: f"cus_L{n}",
        ),
        "lower(customer_email)": (
            "SELECT stripe_customer_id FROM stripe_customers WHERE lower(customer_email) = lower(:v)",
            lambda n: f"user{n}@example.com",
        ),
    }
    results = []
    with engine.connect() as connection:
        for name, (sql, value) in queries.items():
            plan = " ".join(row[0] for row in connection.execute(text("EXPLAIN " + sql), {"v": value(1)}))
            timings = []
            for _ in range(samples_per_kind):
                n = random.randint(1, rows)
                started = time.perf_counter()
                found = connection.execute(text(sql), {"v": value(n)}).first()
                timings.append(time.perf_counter() - started)
                assert found is not None
            index = plan.split(" using ", 1)[1].split()[0] if " using " in plan else "?"
            results.append(
                {
                    "lookup by": name,
                    "p50 ms": percentile(timings, 0.5) * 1000,
                    "p99 ms": percentile(timings, 0.99) * 1000,
                    "plan": ("Index Scan" if "Index" in plan else "SEQ SCAN") + f" on {index}",
                }
            )
    return results


def backfill_database_work(engine: Engine, customers: int) -> float:
    changes = [
        customer_state(
            samples.customer(f"cus_B{n}", email=f"b{n}@example.com", name=f"B {n}", metadata={"plan": "pro"}), "user_id"
        ).as_json()
        for n in range(customers)
    ]
    started = time.perf_counter()
    for start in range(0, customers, 500):
        objects_store.apply_states(engine, changes[start : start + 500], Source.BACKFILL, int(time.time()))
    return customers / (time.perf_counter() - started)
