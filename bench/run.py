"""Benchmarks (figures, not assertions): `python -m bench.run`.

1. end to end: signed customer.updated events (~2.5 KB, 3,000 customers) posted by a load generator
   in other processes (wrk when installed) to the consumer under gunicorn, to a bare verify-only
   app with the same gunicorn settings, and to both lines of stripe-sync-engine (bench/peer.py),
   each on a database of its own: all each can take (median of 3 rounds, with CPU, WAL and database
   bytes per event and the rows written counted afterwards), then the two apps paced at 500/s.
2. the database ceiling: stripe_apply_event called directly by pgbench.
3. lookups on 1,000,000 rows by user_id, stripe_customer_id and lower(customer_email), with EXPLAIN.
4. backfill: 100,000 customers through the batched upsert (the database work of `backfill`).

Runs on the embedded Postgres in a temporary folder, on a scratch cluster of the server binaries
given with --postgres-bin, or on DATABASE_URL (its tables are truncated: use a scratch server).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import stripe
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from bench import cluster, database, load, peer, wrk
from bench.database import percentile
from webhook import migrations, samples
from webhook.database import make_engine
from webhook.serving import gunicorn_command

SECRET = "whsec_bench_secret_0123456789"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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


def _serve(
    app: str, port: int, env: dict[str, str], workers: int, cwd: Path | None = None, command: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """The app under the project's gunicorn settings, or under `command` (another server)."""
    process = subprocess.Popen(
        command or gunicorn_command(f"127.0.0.1:{port}", "--workers", str(workers), "--log-level", "warning", app=app),
        env=env,
        cwd=cwd,  # `python -m` puts the working directory first on sys.path, before PYTHONPATH
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return process
        except OSError as error:
            if getattr(error, "code", None) is not None:  # the baselines have no /healthz: it is up
                return process
            time.sleep(0.2)
    raise RuntimeError(f"{app} did not start")


def _latency_row(latencies: list[float], errors: int, wall: float) -> dict[str, float]:
    return {
        "requests": float(len(latencies)),
        "events/s": len(latencies) / wall,
        "p50 ms": percentile(latencies, 0.5) * 1000,
        "p99 ms": percentile(latencies, 0.99) * 1000,
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


def _database_bytes(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


def _full_load(
    port: int, server: subprocess.Popen[bytes], args: argparse.Namespace, engine: Engine | None = None
) -> dict[str, float]:
    """Closed-loop load from args.connections keep-alive clients (wrk when installed), and the CPU
    the server's workers (or the server itself, when it has none) and Postgres spent per event
    meanwhile, and with an engine the WAL bytes per event."""
    workers = psutil.Process(server.pid).children() or [psutil.Process(server.pid)]
    # wrk needs more distinct events than the fastest system can take, or it sends some twice.
    bodies = _signed_events(int(args.seconds * 9000) if wrk.available() else args.events, 3000)
    before = {"server": _cpu_seconds(workers), "postgres": _cpu_seconds(_postgres())}
    wal_before = _wal_lsn(engine)
    if wrk.available():
        row = wrk.run(port, bodies, args.connections, args.seconds)
    else:
        row = _latency_row(*load.run(port, bodies, args.connections, 2, None, args.seconds))
    events = row["requests"]
    for name, processes in (("server", workers), ("postgres", _postgres())):
        after = _cpu_seconds(processes)
        used = sum(seconds - before[name].get(pid, 0.0) for pid, seconds in after.items())
        row[f"{name} CPU ms/event"] = used / events * 1000
    row["total CPU ms/event"] = row["server CPU ms/event"] + row["postgres CPU ms/event"]
    wal_after = _wal_lsn(engine)
    if wal_before is not None and wal_after is not None:
        row["WAL bytes/event"] = (wal_after - wal_before) / events
    return row


def _settle(engine: Engine) -> None:
    """Let Postgres finish what a saturating run left behind (vacuum, dirty buffers), so that it
    does not land in the next run's figures."""
    with engine.connect() as connection:
        connection.execute(text("VACUUM ANALYZE"))
    time.sleep(float(os.environ.get("BENCH_SETTLE_SECONDS", "10")))


def _saturate(
    name: str, port: int, server: subprocess.Popen[bytes], args: argparse.Namespace, engine: Engine | None
) -> dict[str, Any]:
    """The median of args.rounds closed-loop rounds, and with an engine what the rounds left in the
    database per event (tables, indexes, TOAST; after a VACUUM)."""
    load.run(port, _signed_events(500, 100), args.connections, 2, None, 10)  # warm up
    size_before = None if engine is None else _database_bytes(engine)
    rounds = []
    for _ in range(args.rounds):
        rounds.append(_full_load(port, server, args, engine))
        if engine is not None:
            _settle(engine)
    row: dict[str, Any] = {
        "what": f"{name} (median of {args.rounds})",
        **sorted(rounds, key=lambda r: r["events/s"])[len(rounds) // 2],
    }
    if engine is not None and size_before is not None:
        row["DB bytes/event"] = (_database_bytes(engine) - size_before) / sum(r["requests"] for r in rounds)
    row.pop("requests")
    row["sent"] = sum(r["requests"] for r in rounds)
    # Each round's events are for 3,000 new customers, in turn (the warm-up's for 100 more).
    row["_customers"] = 100 + sum(min(3000, int(r["requests"])) for r in rounds)
    return row


def _written(row: dict[str, Any], customers: int, described: str) -> None:
    """Rows written, and a system that answered without writing every customer it was sent
    (a 200 that stored nothing, say) is marked and its figures dropped: they cannot count."""
    expected = row.pop("_customers")
    row["rows written"] = described
    if customers < expected:
        row["what"] += f": NOT COUNTED, {customers:,} of {expected:,} customers written"
        for key in ("events/s", "p50 ms", "p99 ms"):
            row[key] = ""


def end_to_end(engine: Engine, database_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-metrics-"),
    }
    rows: list[dict[str, Any]] = []
    for name, app, its_engine in (
        ("baseline: verify only", "bench.baseline:create_asgi()", None),
        ("consumer", "webhook.asgi:create_app()", engine),
    ):
        port = _free_port()
        server = _serve(app, port, env, args.workers)
        try:
            rows.append(_saturate(name, port, server, args, its_engine))
            if its_engine is not None:
                _written(rows[-1], *_consumer_rows(its_engine))
            else:
                rows[-1].pop("_customers")
            if args.rate:
                # wrk cannot pace, so the fixed rate comes from the Python generator, for both apps.
                paced = _signed_events(int(args.rate * args.seconds), 3000)
                rows.append(
                    {
                        "what": f"{name}, paced at {args.rate}/s",
                        **_latency_row(*load.run(port, paced, args.connections, 2, args.rate, args.seconds)),
                    }
                )
                rows[-1]["sent"] = rows[-1].pop("requests")
        finally:
            server.terminate()
            server.wait()
    return rows


def _consumer_rows(engine: Engine) -> tuple[int, str]:
    with engine.connect() as connection:
        events, customers, audit = connection.execute(
            text(
                "SELECT (SELECT count(*) FROM stripe_webhook_events), (SELECT count(*) FROM stripe_customers), "
                "(SELECT count(*) FROM stripe_customers_audit)"
            )
        ).one()
    return customers, f"{events:,} events, {customers:,} customers, {audit:,} audit"


def peers_end_to_end(database_url: str, args: argparse.Namespace) -> list[dict[str, Any]] | str:
    """stripe-sync-engine, each version on a database of its own on the same server, under the same
    load; its rows are counted afterwards, so a peer answering 200 without writing cannot count."""
    modules = peer.install()
    if isinstance(modules, str):
        return modules
    rows = []
    for each in peer.PEERS:
        peer_url = _scratch_database(database_url, each.database)
        engine = make_engine(peer_url, pool_size=1)
        port = _free_port()
        try:
            server = peer.serve(each, modules, peer_url, SECRET, port)
        except RuntimeError as error:
            rows.append({"what": f"{each.name}: skipped ({error})"})
            engine.dispose()
            continue
        try:
            rows.append(_saturate(each.name, port, server, args, engine))
        finally:
            server.terminate()
            server.wait()
        customers = peer.customers_written(engine)
        _written(rows[-1], customers, f"{customers:,} customers")
        engine.dispose()
    return rows


def _scratch_database(database_url: str, name: str) -> str:
    admin = make_engine(database_url, pool_size=1)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return str(make_url(database_url).set(database=name).render_as_string(hide_password=False))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 or value.is_integer() else f"{value:,.2f}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    headers = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(h, "")) for h in headers] for row in rows]
    return "\n".join(
        ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(c) + " |" for c in cells]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=int, default=500, help="the paced runs' events/s (0: no paced runs)")
    parser.add_argument("--lookup-rows", type=int, default=1_000_000)
    parser.add_argument("--backfill-customers", type=int, default=100_000)
    parser.add_argument("--postgres-bin", type=Path, help="run a scratch cluster of these server binaries")
    parser.add_argument("--only-end-to-end", action="store_true", help="skip pgbench, lookups and backfill")
    args = parser.parse_args()

    database_url = cluster.server(args.postgres_bin, os.environ.get("DATABASE_URL"))
    engine = make_engine(database_url, pool_size=2, statement_timeout="1h")
    migrations.migrate(engine, shim=True)

    def clean() -> None:
        with engine.connect() as connection:
            connection.execute(
                text("TRUNCATE stripe_customers, stripe_webhook_events, stripe_customers_audit, auth.users CASCADE")
            )

    with engine.connect() as connection:
        server_version = connection.execute(text("SHOW server_version")).scalar_one()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"PostgreSQL {server_version}, {time.strftime('%Y-%m-%d')}; "
        f"load: {'wrk' if wrk.available() else 'Python generator (no wrk on PATH)'}, "
        f"{args.connections} keep-alive connections, {args.seconds:.0f} s, gunicorn {args.workers} workers\n"
    )
    clean()
    e2e = end_to_end(engine, database_url, args)
    peers = peers_end_to_end(database_url, args)
    if isinstance(peers, str):
        print(f"stripe-sync-engine skipped: {peers}\n")
    else:
        e2e.extend(peers)
    print(_table(e2e))
    if args.only_end_to_end:
        return
    clean()
    tps = database.pgbench_ceiling(database_url, 15)
    print(
        f"\ndatabase ceiling (pgbench, 8 clients, stripe_apply_event): {tps:,.0f} events/s\n"
        if tps
        else "\npgbench not found: database ceiling skipped\n"
    )
    clean()
    print(_table(database.lookups(engine, args.lookup_rows, 2000)))
    clean()
    print(
        f"\nbackfill database work: {database.backfill_database_work(engine, args.backfill_customers):,.0f} "
        f"customers/s ({args.backfill_customers:,} customers, 500 per statement)"
    )
    clean()


if __name__ == "__main__":
    main()
