"""Stalled and slow clients beside real deliveries, against gunicorn on loopback with raw sockets."""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
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


@pytest.mark.reliability  # slow (a long wait by design): beside the soak, not in the default run
def test_stalled_clients_cannot_starve_deliveries(database_url: str, engine: Engine) -> None:
    events = [samples.event("customer.created", samples.customer()) for _ in range(40)]
    answered_first = [json.dumps(samples.event("customer.created", samples.customer())) for _ in range(8)]
    with gunicorn(database_url, workers=2) as (port, _):
        # 64 per kind: many more than the 2 workers × 4 threads that used to be all it took.
        stalled = [_open(port, sent) for sent in STALLED.values() for _ in range(64)]
        # And kept-alive connections whose first request was answered and whose next one stalls.
        kept = [_open(port, _request(body) + b"\r\n" + body.encode()) for body in answered_first]
        for connection in kept:
            answer = b""
            while not answer.endswith(b'"processed"}'):
                answer += connection.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200 OK")
            connection.sendall(STALLED["half the headers"])
        time.sleep(0.5)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda event: post_event(port, event, timeout=5), events))
        took = time.monotonic() - started
        assert [status for status, _ in answers] == [200] * len(events)
        processed = count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status = 'processed'")
        assert processed == len(events) + len(kept)
        print(f"\n{len(events)} deliveries beside {len(stalled) + len(kept)} stalled clients: {took:.2f} s")

        # The stalled connections are closed once they have had REQUEST_SECONDS for one request.
        time.sleep(REQUEST_SECONDS + 2)
        for connection in [*stalled, *kept]:
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


# Requests a byte-pattern check took for whole, which then held a thread reading with no timeout.
FOOLING = {
    # A chunked body whose bytes so far end like the last chunk: "5\r\n[10\r\n" is one 5-byte chunk,
    # then "\r\n" opens the next chunk's size line.
    "chunked look-alike": b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\n[10\r\n\r\n",
    "64 KiB of headers, no end": b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-Filler-%d: %s\r\n" % (n, b"a" * 100) for n in range(700)),
    "2 MB declared, not sent": b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n",
}


def _deliver_beside(port: int, hostile: bytes, sockets: int) -> tuple[list[socket.socket], list[int], float]:
    opened = [_open(port, hostile) for _ in range(sockets)]
    time.sleep(0.5)
    events = [samples.event("customer.created", samples.customer()) for _ in range(6)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda event: post_event(port, event, timeout=5), events))
    return opened, [status for status, _ in answers], time.monotonic() - started


def _answer_of(connection: socket.socket) -> bytes:
    connection.settimeout(3)
    answer = b""
    while chunk := connection.recv(4096):
        answer += chunk
    return answer


def test_crafted_requests_cannot_hold_the_threads(database_url: str, engine: Engine) -> None:
    with gunicorn(database_url, workers=2) as (port, _):
        for kind, hostile in FOOLING.items():
            opened, statuses, took = _deliver_beside(port, hostile, 24)
            print(f"\n{kind}: 6 deliveries beside 24 sockets answered {statuses} in {took:.2f} s")
            assert statuses == [200] * 6, kind
            if kind == "chunked look-alike":
                # Still being read (not whole): no answer yet, dropped after REQUEST_SECONDS.
                opened[0].settimeout(0.2)
                with pytest.raises(TimeoutError):
                    opened[0].recv(100)
            else:
                # Refused from the event loop at once, each with its status, never given a thread.
                expected = b"HTTP/1.1 431 " if kind.startswith("64 KiB") else b"HTTP/1.1 413 "
                assert all(_answer_of(connection).startswith(expected) for connection in opened), kind
            for connection in opened:
                connection.close()
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status = 'processed'") == 18


def _chunked(body: bytes, trailer: bytes = b"") -> bytes:
    middle = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:middle], body[middle:]))
    return chunks + b"0\r\n" + trailer + b"\r\n"


def _signed_head(body: str, framing: str) -> bytes:
    return (
        f"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Stripe-Signature: {sign(body)}\r\n{framing}\r\n\r\n"
    ).encode()


def _answers(connection: socket.socket, wanted: int) -> list[bytes]:
    """The status lines of `wanted` answers read from one connection."""
    connection.settimeout(5)
    received = b""
    while received.count(b"HTTP/1.1 ") < wanted:
        chunk = connection.recv(65536)
        assert chunk, f"closed after {received.count(b'HTTP/1.1 ')} answers"
        received += chunk
    return re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", received)


def test_chunked_with_a_trailer_and_pipelined_requests_are_answered(database_url: str, engine: Engine) -> None:
    bodies = [json.dumps(samples.event("customer.created", samples.customer())) for _ in range(4)]
    with gunicorn(database_url, workers=1) as (port, _):
        with_trailer = _signed_head(bodies[0], "Transfer-Encoding: chunked") + _chunked(
            bodies[0].encode(), b"X-Trailer: yes\r\n"
        )
        assert _answers(_open(port, with_trailer), 1) == [b"HTTP/1.1 200 OK"]

        # A chunked request with another behind it in the same packet, then a third sent later on
        # the same connection: all three answered in order.
        pipelined = _open(
            port,
            _signed_head(bodies[1], "Transfer-Encoding: chunked")
            + _chunked(bodies[1].encode())
            + _signed_head(bodies[2], f"Content-Length: {len(bodies[2])}")
            + bodies[2].encode(),
        )
        assert _answers(pipelined, 2) == [b"HTTP/1.1 200 OK"] * 2
        pipelined.sendall(_signed_head(bodies[3], f"Content-Length: {len(bodies[3])}") + bodies[3].encode())
        assert _answers(pipelined, 1) == [b"HTTP/1.1 200 OK"]
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status = 'processed'") == 4


def test_what_the_parser_refuses_is_answered_400_from_the_loop(database_url: str, engine: Engine) -> None:
    with gunicorn(database_url, workers=1) as (port, _):
        for refused in (
            b"GARBAGE\r\n\r\n",
            b"POST /webhooks/stripe HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /webhooks/stripe HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ):
            answer = _answer_of(_open(port, refused))
            assert answer.startswith(b"HTTP/1.1 400 "), refused
            assert answer.endswith(b'{"error": "bad request"}')
