"""The server's HTTP layer (webhook/worker.py, webhook/asgi.py) against gunicorn on loopback with raw
sockets: smuggling attempts refused from the loop, the limits, a console that cannot hold deliveries,
a graceful restart under load (tests/test_slow_clients.py has the stalled and crafted clients), and
the ASGI app's own limit for servers without these guards."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
import uvicorn
from sqlalchemy import Engine
from werkzeug.security import generate_password_hash

from tests.server import gunicorn, post_event
from tests.support import count, settings_for, sign
from webhook import samples, worker
from webhook.asgi import CONSOLE_THREADS
from webhook.asgi import create_app as create_asgi

TOO_LARGE = (
    b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\nContent-Length: 37\r\n"
    b'Connection: close\r\n\r\n{"error": "request entity too large"}'
)
BAD_REQUEST = b'HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 24\r\nConnection: close\r\n\r\n{"error": "bad request"}'  # noqa: E501


def _exchange(port: int, sent: bytes, seconds: float = 3) -> bytes:
    """What the server answers `sent` with, up to its close."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=seconds)
    try:
        connection.sendall(sent)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        return answer
    finally:
        connection.close()


def _signed(body: str, *headers: str) -> bytes:
    head = f"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: {sign(body)}\r\n"
    return (head + "".join(f"{header}\r\n" for header in headers) + "\r\n" + body).encode()


def test_smuggling_and_oversize_are_refused_from_the_loop(database_url: str, engine: Engine) -> None:
    body = json.dumps(samples.event("customer.created", samples.customer()))
    n = len(body)
    with gunicorn(database_url, workers=1, MAX_WEBHOOK_BYTES="8192") as (port, _):
        for smuggled in (
            _signed(body, f"Content-Length: {n}", f"Content-Length: {n + 10}"),  # two lengths
            _signed(body, f"Content-Length: {n}", f"Content-Length: {n}"),  # even when they agree
            _signed(body, "X-Folded: a", " b", f"Content-Length: {n}"),  # obs-fold
            _signed(body, f"Content-Length: {n}", "Transfer-Encoding: chunked"),  # CL + TE
            _signed(body, "Transfer-Encoding: chunked, identity"),  # chunked not last
        ):
            assert _exchange(port, smuggled) == BAD_REQUEST, smuggled[:200]
        # Over the limit (the app's MAX_WEBHOOK_BYTES, which the protocol takes from it): declared,
        # or sent in chunks with nothing declared. Answered by the protocol before the rest is read,
        # and what the client still sends does not reset the answer away.
        declared = _exchange(port, _signed("x" * 20000, "Content-Length: 20000"))
        chunks = b"".join(b"1000\r\n" + b"x" * 4096 + b"\r\n" for _ in range(64)) + b"0\r\n\r\n"
        streamed = _exchange(port, _signed("", "Transfer-Encoding: chunked") + chunks)
        assert declared == streamed == TOO_LARGE
        # The same body, framed once: processed.
        assert _exchange(port, _signed(body, f"Content-Length: {n}", "Connection: close")).startswith(
            b"HTTP/1.1 200 OK"
        )
        # The header limit is one request's: a kept-alive connection may carry far more in all, and
        # one read may hold many pipelined requests (here 80, ~90 KB sent at once).
        events = [samples.event("customer.created", samples.customer()) for _ in range(80)]
        bodies = [json.dumps(event) for event in events]
        pipelined = b"".join(_signed(text, f"Content-Length: {len(text)}") for text in bodies)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(pipelined)
            answered = b""
            while answered.count(b"HTTP/1.1 200 OK") < len(events) and b" 431 " not in answered:
                answered += connection.recv(65536)
        assert answered.count(b"HTTP/1.1 200 OK") == len(events) and b" 431 " not in answered
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == 81


def test_a_stalled_console_holds_no_delivery(database_url: str, engine: Engine) -> None:
    """Every console thread of both workers held by a sign-in form whose body never comes (three
    times over): deliveries and the liveness probe are answered at once all the same."""
    events = [samples.event("customer.created", samples.customer()) for _ in range(16)]
    stalled_form = b"POST /support/signin HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    with gunicorn(database_url, workers=2, SUPPORT_USERS=f"alice:{generate_password_hash('x' * 16)}") as (port, _):
        held = []
        for _ in range(CONSOLE_THREADS * 2 * 3):
            connection = socket.create_connection(("127.0.0.1", port), timeout=30)
            connection.sendall(stalled_form + b"Content-Length: 100\r\n\r\nuser=")
            held.append(connection)
        time.sleep(0.5)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda event: post_event(port, event, timeout=3)[0], events))
        took = time.monotonic() - started
        alive = _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for connection in held:
            connection.close()
    print(f"\n{len(events)} deliveries beside {len(held)} stalled console requests: {took:.2f} s")
    assert answers == [200] * len(events)
    assert alive.startswith(b"HTTP/1.1 200 OK")
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status = 'processed'") == len(events)


@pytest.mark.reliability  # ~20 s of load and two restarts
def test_a_graceful_restart_turns_no_delivery_away(database_url: str, engine: Engine) -> None:
    """gunicorn's HUP (a deploy: new workers, the old ones finish what they hold) twice, under steady
    deliveries from 8 clients: every one answered 200 and stored."""
    answers: list[int] = []
    sent: list[str] = []
    stop = threading.Event()

    def deliver() -> None:
        while not stop.is_set():
            event = samples.event("customer.created", samples.customer())
            sent.append(event["id"])
            answers.append(post_event(port, event, timeout=30)[0])

    with gunicorn(database_url, workers=2) as (port, master):
        before = {worker.pid for worker in psutil.Process(master.pid).children()}
        clients = [threading.Thread(target=deliver) for _ in range(8)]
        for client in clients:
            client.start()
        for _ in range(2):
            time.sleep(4)
            os.kill(master.pid, signal.SIGHUP)
        time.sleep(6)
        stop.set()
        for client in clients:
            client.join()
        after = {worker.pid for worker in psutil.Process(master.pid).children()}
    print(f"\n{len(answers)} deliveries across two restarts: {sorted(set(answers))}")
    assert before.isdisjoint(after) and len(after) == 2  # both workers were replaced
    assert len(answers) > 200 and set(answers) == {200}
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status = 'processed'") == len(sent)


def test_the_asgi_app_keeps_the_body_limit_under_any_server(database_url: str, engine: Engine) -> None:
    """webhook/asgi.py called directly, as a server without this worker's guards would: a body
    streamed past MAX_WEBHOOK_BYTES is answered 413 and nothing is written, a signed one within it
    is processed."""
    app = create_asgi(settings_for(database_url, MAX_WEBHOOK_BYTES="4096"), engine=engine)
    scope = {"type": "http", "method": "POST", "path": "/webhooks/stripe", "headers": []}

    def answer_to(chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        last = len(chunks) - 1
        incoming = [{"type": "http.request", "body": chunk, "more_body": n < last} for n, chunk in enumerate(chunks)]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return incoming.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        asyncio.run(app({**scope, "headers": headers}, receive, send))
        return sent[0]["status"], b"".join(message.get("body", b"") for message in sent[1:])

    status, body = answer_to([b"x" * 3000, b"x" * 3000], [(b"stripe-signature", sign("x" * 6000).encode())])
    assert (status, json.loads(body)) == (413, {"error": "request entity too large"})
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == 0

    event = json.dumps(samples.event("customer.created", samples.customer()))
    half = len(event) // 2
    signed = [(b"stripe-signature", sign(event).encode())]
    status, body = answer_to([event[:half].encode(), event[half:].encode()], signed)
    assert status == 200 and json.loads(body)["status"] == "processed"


def test_a_slow_answer_is_sent_while_the_next_request_waits_behind_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline is for reading a request: a pipelined one begun behind an answer the app is
    still making waits for it (the app's own timeouts bound that), and then has its own deadline.
    The protocol under uvicorn in this process, the deadline shortened to 0.3 s, an app that
    answers after a second."""
    monkeypatch.setattr(worker, "REQUEST_SECONDS", 0.3)

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await asyncio.sleep(1.0)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(slow, http=worker.GuardedProtocol, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    running = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    running.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with socket.create_connection(sock.getsockname(), timeout=5) as connection:
            connection.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            time.sleep(0.1)
            connection.sendall(b"POST /x HTTP/1.1\r\nHo")  # the next request, begun
            answer = b""
            while chunk := connection.recv(65536):  # until the server closes
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\nok")
    finally:
        server.should_exit = True
        running.join(10)
        sock.close()
