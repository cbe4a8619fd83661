"""Concurrency through a real gunicorn with two worker processes, on a real Postgres."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Engine

from tests.server import gunicorn, post_event
from tests.support import audit_steps_backwards, count, customer_row, now
from webhook import samples


def test_shuffled_duplicated_deliveries_from_16_clients(database_url: str, engine: Engine) -> None:
    customers = [samples.customer() for _ in range(20)]
    base = now() - 10_000
    events = [
        samples.event("customer.updated", {**customer, "name": f"v{i}"}, created=base + i * 20 + n)
        for n, customer in enumerate(customers)
        for i in range(10)
    ]
    deliveries = events * 2  # every event delivered twice, as Stripe's retries do
    random.Random(5).shuffle(deliveries)

    with gunicorn(database_url, workers=2) as (port, _), ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda event: post_event(port, event), deliveries))

    assert {status for status, _ in answers} == {200}
    statuses = [answer["status"] for _, answer in answers]
    assert statuses.count("duplicate") == len(events)  # exactly one of each pair was applied
    for customer in customers:
        assert customer_row(engine, customer["id"])["customer_name"] == "v9"  # type: ignore[index]
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == len(events)
    assert count(engine, "SELECT count(DISTINCT id) FROM stripe_webhook_events") == len(events)
    assert audit_steps_backwards(engine) == 0


def test_metrics_add_up_across_workers(database_url: str, engine: Engine) -> None:
    import urllib.request

    with gunicorn(database_url, workers=2) as (port, _):
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda _: post_event(port, samples.event_of_type("charge.succeeded")), range(40)))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    line = next(line for line in metrics.splitlines() if line.startswith("stripe_webhook_events_total{"))
    assert 'outcome="ignored"' in line and 'type="charge.succeeded"' in line and float(line.split()[-1]) == 40


def test_answers_carry_the_current_date(database_url: str) -> None:
    # uvicorn formats the Date header once a second instead of per answer.
    import email.utils
    import time
    import urllib.request

    with gunicorn(database_url, workers=1) as (port, _):
        dates = []
        for _ in range(3):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                dates.append(email.utils.parsedate_to_datetime(answer.headers["Date"]).timestamp())
            time.sleep(1.1)
    assert all(abs(date - time.time()) < 6 for date in dates)
    assert len(set(dates)) == 3  # it moves on with the clock


def test_the_http_answers_through_the_real_server(database_url: str, engine: Engine) -> None:
    """The contract's answers as the server sends them (webhook/asgi.py under gunicorn), not Flask's test client."""
    import http.client
    import json

    from tests.support import sign

    event = samples.event("customer.created", samples.customer())
    body = json.dumps(event)

    def ask(method: str, path: str, payload: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request(method, path, payload, headers or {})
            answer = connection.getresponse()
            content = answer.read()
            kind = answer.getheader("Content-Type") or ""
            return answer.status, json.loads(content) if kind.startswith("application/json") else (kind, content)
        finally:
            connection.close()

    with gunicorn(database_url, workers=1, MAX_WEBHOOK_BYTES="4096") as (port, _):
        signed = {"Stripe-Signature": sign(body), "Content-Type": "application/json"}
        assert ask("POST", "/webhooks/stripe", body.encode(), signed) == (
            200,
            {"event_id": event["id"], "status": "processed"},
        )
        assert ask("POST", "/webhooks/stripe", body.encode(), signed)[1]["status"] == "duplicate"
        assert ask("POST", "/webhooks/stripe", body.encode()) == (400, {"error": "missing Stripe-Signature header"})
        forged = {"Stripe-Signature": sign(body, secret="whsec_not_ours")}
        assert ask("POST", "/webhooks/stripe", body.encode(), forged) == (
            400,
            {"error": "no valid signature for any configured secret"},
        )
        assert ask("POST", "/webhooks/stripe", b"x" * 5000, {"Stripe-Signature": sign("x" * 5000)})[0] == 413
        assert ask("GET", "/webhooks/stripe")[0] == 405
        assert ask("GET", "/healthz") == (200, {"status": "ok"})
        assert ask("POST", "/healthz")[0] == 405  # answered from the loop for GET only, like every route
        assert ask("GET", "/readyz") == (200, {"status": "ready"})
        status, (kind, metrics) = ask("GET", "/metrics")
        assert status == 200 and kind.startswith("text/plain")
        assert b'stripe_webhook_events_total{outcome="processed",type="customer.created"} 1.0' in metrics
