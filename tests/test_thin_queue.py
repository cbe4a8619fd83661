"""Thin notifications at Stripe's scale, through gunicorn (2 workers) on a real Postgres, against a
fake Stripe over HTTP that is slow, rate-limited or hanging: answered at once, read in the
background once per object, under the deployment's read budget, and never lost."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
from sqlalchemy import Engine, text

from tests.fake_stripe import FakeStripe
from tests.server import gunicorn, post_event
from tests.support import count, customer_row, wait_for
from webhook import samples

KEYED = {"STRIPE_API_KEY": "sk_test_fake"}


def _timed_post(port: int, event: dict[str, Any]) -> tuple[int, str, float]:
    started = time.monotonic()
    status, answer = post_event(port, event)
    return status, str(answer.get("status")), time.monotonic() - started


def _names_right(engine: Engine, customers: list[dict[str, Any]]) -> bool:
    return all((customer_row(engine, c["id"]) or {}).get("customer_name") == c["name"] for c in customers)


def test_at_idle_a_notification_is_applied_within_two_seconds(database_url: str, engine: Engine) -> None:
    fake = FakeStripe()
    customers = [fake.add_customer(name=f"idle {n}") for n in range(4)]
    with fake.serving() as base, gunicorn(database_url, workers=2, STRIPE_API_BASE=base, **KEYED) as (port, _):
        for customer in customers:  # whichever worker answers, its own readers or the other's take it
            status, outcome, _ = _timed_post(port, samples.thin_event("v1.customer.updated", customer["id"]))
            assert (status, outcome) == (200, "queued")
            answered = time.monotonic()
            wait_for(lambda c=customer: _names_right(engine, [c]), 2)
            assert time.monotonic() - answered < 2
            time.sleep(0.6)  # idle again: the readers went back to waiting


def test_snapshot_deliveries_are_answered_at_once_while_stripe_hangs(database_url: str, engine: Engine) -> None:
    fake = FakeStripe()
    customers = [fake.add_customer(name=f"hung {n}") for n in range(32)]
    with fake.serving() as base, gunicorn(database_url, workers=2, STRIPE_API_BASE=base, **KEYED) as (port, _):
        fake.gate.clear()  # every read of Stripe hangs
        notifications = [samples.thin_event("v1.customer.updated", c["id"]) for c in customers for _ in range(2)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda n: _timed_post(port, n), notifications))
            assert Counter((status, outcome) for status, outcome, _ in answers) == {(200, "queued"): 64}
            snapshots = [samples.event("customer.created", samples.customer()) for _ in range(16)]
            answered = list(pool.map(lambda event: _timed_post(port, event), snapshots))
        assert Counter((status, outcome) for status, outcome, _ in answered) == {(200, "processed"): 16}
        slowest = max(took for _, _, took in answered)
        assert slowest < 2, slowest  # before the queue: 11-15 s behind the reads
        assert fake.requests, "the readers were reading (and hanging) meanwhile"
        fake.gate.set()
        wait_for(lambda: _names_right(engine, customers), 60, every=0.2)
        # A customer's second notification may have arrived during the first one's read: it waits
        # for a read of its own, a moment later.
        wait_for(lambda: count(engine, "SELECT count(*) FROM stripe_thin_waiting") == 0, 30, every=0.2)
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status = 'processed'") == 64 + 16


@pytest.mark.reliability
def test_a_burst_against_a_slow_rate_limited_stripe(database_url: str, engine: Engine) -> None:
    """A price migration as a test-mode account sees it: 1,000 notifications, 10 for each of 100
    customers, from 16 senders; Stripe takes 150 ms a read and allows 25 requests a second."""
    fake = FakeStripe()
    fake.delay, fake.rate_limit = 0.15, 25
    customers = [fake.add_customer(name=f"migrated {n}") for n in range(100)]
    notifications = [samples.thin_event("v1.customer.updated", c["id"]) for _ in range(10) for c in customers]
    random.Random(3).shuffle(notifications)
    env = {**KEYED, "STRIPE_API_RATE": "20"}
    with fake.serving() as base, gunicorn(database_url, workers=2, STRIPE_API_BASE=base, **env) as (port, _):
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda n: _timed_post(port, n), notifications))
        sent = time.monotonic() - started
        wait_for(lambda: _names_right(engine, customers), 60, every=0.5)
        settled = time.monotonic() - started
        wait_for(lambda: count(engine, "SELECT count(*) FROM stripe_thin_waiting") == 0, 30)
    latencies = sorted(took for _, _, took in answers)
    reads = Counter(path for _, path in fake.requests)
    print(
        f"\nburst: 1,000 answered in {sent:.1f} s (p99 {latencies[989] * 1000:.0f} ms), all rows right after "
        f"{settled:.1f} s; {sum(reads.values())} reads (most for one customer {max(reads.values())}), "
        f"{fake.rate_limited} answered 429"
    )
    assert Counter((status, outcome) for status, outcome, _ in answers) == {(200, "queued"): 1000}
    assert max(reads.values()) <= 4 and sum(reads.values()) <= 300  # at most a few reads per customer
    assert fake.rate_limited <= 5
    with engine.connect() as connection:
        statuses = dict(connection.execute(text("SELECT status, count(*) FROM stripe_webhook_events GROUP BY 1")).all())
    assert statuses == {"processed": 1000}


@pytest.mark.reliability
def test_a_killed_server_leaves_its_notifications_to_the_next(database_url: str, engine: Engine) -> None:
    fake = FakeStripe()
    customers = [fake.add_customer(name=f"survivor {n}") for n in range(6)]
    with fake.serving() as base:
        with gunicorn(database_url, workers=2, STRIPE_API_BASE=base, **KEYED) as (port, master):
            fake.gate.clear()  # the reads hang: the first server dies holding them
            for customer in customers:
                for _ in range(3):
                    assert post_event(port, samples.thin_event("v1.customer.updated", customer["id"]))[0] == 200
            wait_for(lambda: count(engine, "SELECT count(*) FROM stripe_thin_waiting WHERE holder IS NOT NULL") > 0, 5)
            for process in [*psutil.Process(master.pid).children(), psutil.Process(master.pid)]:
                os.kill(process.pid, signal.SIGKILL)
            master.wait(10)
        fake.gate.set()
        assert not _names_right(engine, customers)
        with gunicorn(database_url, workers=2, STRIPE_API_BASE=base, **KEYED):
            # The rows the dead readers held wait for their leases to lapse; the rest go at once.
            wait_for(lambda: _names_right(engine, customers), 45, every=0.2)
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status = 'processed'") == 18
    assert count(engine, "SELECT count(*) FROM stripe_thin_waiting") == 0
