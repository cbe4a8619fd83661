"""Stalled and slow clients beside real deliveries, against gunicorn on loopback with raw sockets."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine

from tests.server import gunicorn, post_event
from tests.support import count, sign
from webhook import samples
from webhook.worker import REQUEST_SECONDS

STALLED = {
    "headers, no body": b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",
    "half the headers": b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Le",
    "nothing": b"",
}


def _open(port: int, sent: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(sent)
    return connection


def _request(event_body: str) -> bytes:
    head = (
        "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Stripe-Signature: {sign(event_body)}\r\nContent-Length: {len(event_body)}\r\n"
    )
    return head.encode()


def test_stalled_clients_cannot_starve_deliveries(database_url: str, engine: Engine) -> None:
    events = [samples.event("customer.created", samples.customer()) for _ in range(40)]
    with gunicorn(database_url, workers=2) as (port, _):
        # 64 per kind: many more than the 2 workers × 4 threads that used to be all it took.
        stalled = [_open(port, sent) for sent in STALLED.values() for _ in range(64)]
        time.sleep(0.5)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda event: post_event(port, event, timeout=5), events))
        took = time.monotonic() - started
        assert [status for status, _ in answers] == [200] * len(events)
        assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status = 'processed'") == len(events)
        print(f"\n{len(events)} deliveries beside {len(stalled)} stalled clients: {took:.2f} s")

        # The stalled connections are closed once they have had REQUEST_SECONDS for one request.
        time.sleep(REQUEST_SECONDS + 2)
        for connection in stalled:
            connection.settimeout(1)
            assert connection.recv(100) == b""
            connection.close()


def test_a_slow_honest_client_and_one_expecting_100_continue_are_served(database_url: str, engine: Engine) -> None:
    slow_body = json.dumps(samples.event("customer.created", samples.customer()))
    expecting_body = json.dumps(samples.event("customer.created", samples.customer()))
    with gunicorn(database_url, workers=1) as (port, _):
        slow = _open(port, _request(slow_body) + b"\r\n")
        for start in range(0, len(slow_body), len(slow_body) // 4 + 1):
            time.sleep(0.3)
            slow.sendall(slow_body[start : start + len(slow_body) // 4 + 1].encode())
        assert slow.recv(4096).startswith(b"HTTP/1.1 200")

        expecting = _open(port, _request(expecting_body) + b"Expect: 100-continue\r\n\r\n")
        assert expecting.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        expecting.sendall(expecting_body.encode())
        answer = b""
        while b"HTTP/1.1 200" not in answer:
            answer += expecting.recv(4096)
            assert answer, "closed without an answer"
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status = 'processed'") == 2
