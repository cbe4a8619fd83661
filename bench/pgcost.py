"""What one event costs Postgres (figures, not assertions): `python -m bench.pgcost [REV]`.

The same realistic events (bench.run's signed customer.updated, ~2.5 KB, 3,000 customers) through
the consumer's own statement (store.apply_events, one event a statement), on one connection, with nothing else running:
the backend's own CPU per event (from /proc, so it needs the server on this machine), WAL bytes per
event, and table + index bytes per event afterwards. With REV, the schema and functions of that git
revision on a database of their own beside the working tree's, batches alternating so that the
machine's drift hits both alike. Runs on DATABASE_URL's server (a scratch one: it creates and drops
databases there), or else on an embedded Postgres.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from bench import cluster
from bench.ab import ROOT, migrated_database, worktree
from bench.run import _signed_events, _table, _wal_lsn
from webhook import database, store
from webhook.config import load_settings
from webhook.process import change_for
from webhook.results import Applied, Status
from webhook.signature import parse_event

TABLES = ("stripe_webhook_events", "stripe_customers", "stripe_customers_audit")
TICKS = os.sysconf("SC_CLK_TCK")


def _backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _calls(count: int, customers: int) -> list[tuple[str, dict[str, Any] | None]]:
    settings = load_settings({"STRIPE_WEBHOOK_SECRET": "whsec_bench"})
    calls = []
    for body, _ in _signed_events(count, customers):
        event = parse_event(body)
        change = change_for(event, settings)
        calls.append((event.payload, None if change is None else change.as_json()))
    return calls


def _batch(engine: Engine, calls: list[tuple[str, dict[str, Any] | None]]) -> dict[str, float]:
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchall()[0][0]
        wal_before, cpu_before = _wal_lsn(engine), _backend_cpu(pid)
        for payload, change in calls:
            event = store.EventToApply(payload, change, "webhook")
            outcomes = store.apply_events(connection, [event], database.transaction_settings(engine))
            assert outcomes == [Applied(Status.PROCESSED)], outcomes
        cpu, wal = _backend_cpu(pid) - cpu_before, (_wal_lsn(engine) or 0) - (wal_before or 0)
    finally:
        connection.close()
    return {"backend CPU ms/event": cpu / len(calls) * 1000, "WAL bytes/event": wal / len(calls)}


def _bytes_per_event(engine: Engine, events: int) -> dict[str, float]:
    with engine.connect() as connection:
        connection.execute(text("VACUUM ANALYZE " + ", ".join(TABLES)))
        sizes = {
            table: connection.execute(
                text("SELECT pg_table_size(CAST(:t AS regclass)), pg_indexes_size(CAST(:t AS regclass))"), {"t": table}
            ).one()
            for table in TABLES
        }
        hot = connection.execute(
            text(
                "SELECT n_tup_hot_upd::float / greatest(n_tup_upd, 1) FROM pg_stat_user_tables "
                "WHERE relname = 'stripe_customers'"
            )
        ).scalar_one()
    return {
        "log bytes/event": (sizes[TABLES[0]][0] + sizes[TABLES[0]][1]) / events,
        "audit bytes/event": (sizes[TABLES[2]][0] + sizes[TABLES[2]][1]) / events,
        "of which indexes": sum(size[1] for size in sizes.values()) / events,
        "customer updates HOT": hot,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", nargs="?", help="a git revision whose schema to compare with the working tree's")
    parser.add_argument("--events", type=int, default=4000, help="events a batch")
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()

    server_url = cluster.server(None, os.environ.get("DATABASE_URL"))
    engines: dict[str, Engine] = {}
    with worktree(args.revision) if args.revision else contextlib.nullcontext(None) as old_tree:
        trees = {args.revision: old_tree} if old_tree else {}
        for number, (side, tree) in enumerate({**trees, "working tree": ROOT}.items()):
            url, _ = migrated_database(server_url, f"bench_pgcost_{number}", tree)
            engines[side] = database.make_engine(url, 2)
        # Each batch its own events (each event applied once per side), 3,000 customers.
        calls = _calls(args.events * args.batches, 3000)
        rows: dict[str, list[dict[str, float]]] = {side: [] for side in engines}
        for number in range(args.batches):
            batch = calls[number * args.events : (number + 1) * args.events]
            for side in list(engines)[:: 1 if number % 2 == 0 else -1]:
                rows[side].append(_batch(engines[side], batch))
                print(json.dumps({"side": side, "batch": number + 1, **rows[side][-1]}), flush=True)
        table = []
        for side, engine in engines.items():
            measured = rows[side][1:]  # the first batch fills the customers (inserts, not updates)
            table.append(
                {"side": side}
                | {key: statistics.median(row[key] for row in measured) for key in measured[0]}
                | _bytes_per_event(engine, args.events * args.batches)
            )
            engine.dispose()
    print(f"\nmedian of {args.batches - 1} batches of {args.events:,} events, one connection")
    print(_table(table))


if __name__ == "__main__":
    main()
