"""Outage and crash checks through a real gunicorn on a Postgres of their own.

Slow, so not in the default run: `.venv/bin/python -m pytest -m reliability -s` (prints figures).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
from sqlalchemy import text

from tests.server import gunicorn, post_event
from tests.support import sign
from webhook import samples

pytestmark = pytest.mark.reliability


def _try_post(port: int, event: dict[str, Any]) -> int:
    try:
        return post_event(port, event, timeout=15)[0]
    except (OSError, http.client.HTTPException):
        # Connection dropped, or cut between the answer's head and its body by the kill: not an
        # acknowledgement, and Stripe would retry.
        return 0


def test_database_outage_answers_503_then_recovers(own_postgres: Any) -> None:
    server, engine = own_postgres
    events = [samples.event("customer.created", samples.customer()) for _ in range(30)]
    with gunicorn(str(server.get_uri()), workers=2) as (port, _):
        assert {_try_post(port, event) for event in events[:10]} == {200}

        server.stop()
        started = time.monotonic()
        during = [_try_post(port, event) for event in events[10:20]]
        slowest = (time.monotonic() - started) / len(during)
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert not_ready.value.code == 503
        assert set(during) == {503}
        print(f"\noutage: {len(during)} deliveries answered 503, {slowest * 1000:.0f} ms each on average")

        server.ensure_postgres_running()
        # Stripe's retries of the refused deliveries, then new ones: the pool recovers by itself.
        after = [_try_post(port, event) for event in events[10:]]
        assert set(after) == {200}, after
    engine.dispose()
    with engine.connect() as connection:
        logged = connection.execute(text("SELECT count(*), count(DISTINCT id) FROM stripe_webhook_events")).one()
        rows = connection.execute(text("SELECT count(*) FROM stripe_customers")).scalar_one()
    assert tuple(logged) == (30, 30) and rows == 30


def test_a_restart_while_idle_costs_no_delivery(own_postgres: Any) -> None:
    """Both workers' pools full of connections, Postgres restarted (as Supabase maintenance or a
    failover does), then a dozen deliveries one after another: none sees a 503."""
    server, engine = own_postgres
    warmup = [samples.event("customer.created", samples.customer()) for _ in range(64)]
    events = [samples.event("customer.created", samples.customer()) for _ in range(12)]
    with gunicorn(str(server.get_uri()), workers=2) as (port, _):
        with ThreadPoolExecutor(max_workers=16) as pool:  # each worker's pool holds the connection its events share
            assert set(pool.map(lambda event: _try_post(port, event), warmup)) == {200}
        server.stop()
        server.ensure_postgres_running()
        answers = [_try_post(port, event) for event in events]
    print(f"\nrestart: {len(answers)} deliveries after the restart answered {answers}")
    assert answers == [200] * len(events)
    engine.dispose()  # the test's own connections died with the restart too
    with engine.connect() as connection:
        logged = connection.execute(
            text("SELECT count(*) FROM stripe_webhook_events WHERE status = 'processed' AND id = ANY(:ids)"),
            {"ids": [event["id"] for event in events]},
        ).scalar_one()
    assert logged == len(events)


def test_killed_worker_loses_nothing_acknowledged(own_postgres: Any) -> None:
    server, engine = own_postgres
    events = [samples.event("customer.created", samples.customer()) for _ in range(1200)]
    answered: list[int] = []
    with gunicorn(str(server.get_uri()), workers=2) as (port, master):
        workers = psutil.Process(master.pid).children()

        def post(event: dict[str, Any]) -> int:
            status = _try_post(port, event)
            answered.append(status)
            return status

        def kill_when_busy() -> int:
            # Deliveries provably in flight: a fifth of them answered, the rest still coming.
            while len(answered) < len(events) // 5:
                time.sleep(0.005)
            os.kill(workers[0].pid, signal.SIGKILL)
            return len(answered)

        with ThreadPoolExecutor(max_workers=9) as pool:
            killer = pool.submit(kill_when_busy)
            answers = list(pool.map(post, events))
            answered_before_kill = killer.result()
        acknowledged = [event["id"] for event, status in zip(events, answers, strict=True) if status == 200]
        lost_connections = [event for event, status in zip(events, answers, strict=True) if status != 200]
        retried = [_try_post(port, event) for event in lost_connections]
    print(
        f"\nkill after {answered_before_kill} of {len(events)} answers: {len(acknowledged)} acknowledged, "
        f"{len(lost_connections)} dropped and retried"
    )
    assert answered_before_kill < len(events) - 200  # the kill came with deliveries still to answer
    assert set(retried) <= {200}
    with engine.connect() as connection:
        stored = set(
            connection.execute(text("SELECT id FROM stripe_webhook_events WHERE status = 'processed'")).scalars()
        )
    assert set(acknowledged) <= stored
    assert len(stored) == len(events)


SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
SOAK_RATE = 200  # events/s: steady, well under the consumer's ceiling on this machine


def _rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / 2**20


def _steady_load(port: int, stop_at: float, connections: int, answers: list[int]) -> None:
    customers = [samples.stripe_id("cus") for _ in range(500)]

    def one_connection(n: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        next_send = time.monotonic()
        i = n
        while next_send < stop_at:
            customer = samples.customer(customers[i % len(customers)], name=f"Customer {i}")
            body = json.dumps(samples.event("customer.updated", customer))
            connection.request("POST", "/webhooks/stripe", body, {"Stripe-Signature": sign(body)})
            response = connection.getresponse()
            response.read()
            answers.append(response.status)
            i += connections
            next_send += connections / SOAK_RATE
            time.sleep(max(0.0, next_send - time.monotonic()))

    threads = [threading.Thread(target=one_connection, args=(n,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_soak_steady_load_keeps_worker_memory_flat(own_postgres: Any) -> None:
    """SOAK_SECONDS (default 60) of steady load: no error answers, every worker's RSS within 10%
    of what it was once warm."""
    server, engine = own_postgres
    answers: list[int] = []
    with gunicorn(str(server.get_uri()), workers=2) as (port, master):
        workers = psutil.Process(master.pid).children()
        started = time.monotonic()
        load = threading.Thread(target=_steady_load, args=(port, started + SOAK_SECONDS, 8, answers))
        load.start()
        time.sleep(min(10.0, SOAK_SECONDS / 6))  # warm: pool connections open, caches filled
        warm = {worker.pid: _rss_mb(worker) for worker in workers}
        peak = dict(warm)
        while load.is_alive():
            for worker in workers:
                peak[worker.pid] = max(peak[worker.pid], _rss_mb(worker))
            time.sleep(1)
        end = {worker.pid: _rss_mb(worker) for worker in workers}
        assert psutil.Process(master.pid).children() == workers  # no worker died or was recycled

    elapsed = time.monotonic() - started
    for pid in warm:
        print(
            f"\nsoak worker {pid}: warm {warm[pid]:.1f} MB, peak {peak[pid]:.1f} MB, end {end[pid]:.1f} MB "
            f"({(peak[pid] / warm[pid] - 1) * 100:+.1f}% at peak)"
        )
    rate = len(answers) / elapsed
    print(f"soak: {len(answers)} deliveries in {elapsed:.0f} s ({rate:.0f}/s), statuses {set(answers)}")
    assert answers and set(answers) == {200}
    assert all(peak[pid] <= warm[pid] * 1.10 for pid in warm)
    with engine.connect() as connection:
        logged = connection.execute(text("SELECT count(*) FROM stripe_webhook_events")).scalar_one()
    assert logged == len(answers)
