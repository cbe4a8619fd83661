"""What the server runs (`webhook.asgi:create_app()`): deliveries answered from the event loop,
everything else by the Flask app on a small thread pool of its own.

A delivery's body is read whole in the loop (the server's protocol gives up on one that stalls,
webhook/worker.py), verified and parsed there, and applied through process.process_delivery: the
usual event through the loop's shared statement, whatever may block (Stripe, a failure's record)
on one of DELIVERY_THREADS threads. The console, /metrics and /readyz are the Flask app behind
a2wsgi, on CONSOLE_THREADS threads that deliveries never wait for, with a database pool of their
own (webhook/app.py); /healthz is answered from the loop.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from a2wsgi import WSGIMiddleware
from flask import Flask

from webhook import app as flask_app
from webhook import metrics
from webhook.app import WEBHOOK_PATH, answer_delivery_from_loop
from webhook.config import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Pages and scrapes are few and short, and give up within 3 s on a busy database (the console's own
# pool); eight at once per process let a burst of them say so together instead of in turns.
CONSOLE_THREADS = 8
_JSON = (b"content-type", b"application/json")
_ALIVE = json.dumps({"status": "ok"}).encode()
_TOO_LARGE = json.dumps({"error": "request entity too large"}).encode()


class TooLarge(Exception):
    pass


async def _body(receive: Receive, limit: int) -> bytes | None:
    """The whole body; None if the client went away first. Over the limit: TooLarge (under
    webhook/worker.py the protocol has answered 413 before the app sees it; other servers may not)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise TooLarge
        if not message.get("more_body", False):
            return bytes(body)


async def _answer(send: Send, status: int, payload: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def create_app(settings: Settings | None = None, **options: Any) -> App:
    """The ASGI app around webhook.app.create_app (same arguments)."""
    return App(flask_app.create_app(settings, **options))


class App:
    """The ASGI app serving what webhook.app.create_app made (the worker also puts it around that
    app when a command line names the Flask app, as Procfiles before this server did). `settings`
    are the Flask app's, read once: the worker takes its body limit from them."""

    def __init__(self, wsgi: Flask) -> None:
        self.engine, self.settings = wsgi.extensions["webhook"]
        self.console = WSGIMiddleware(wsgi, workers=CONSOLE_THREADS)  # type: ignore[arg-type]
        self.deliveries = ThreadPoolExecutor(self.settings.delivery_threads, thread_name_prefix="delivery")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/healthz" and scope["method"] in ("GET", "HEAD"):
            await _answer(send, 200, _ALIVE)  # from the loop: a busy console does not fail the probe
            return
        if scope["type"] != "http" or scope["path"] != WEBHOOK_PATH or scope["method"] != "POST":
            await self.console(scope, receive, send)  # type: ignore[arg-type]
            return
        try:
            body = await _body(receive, self.settings.max_webhook_bytes)
        except TooLarge:
            metrics.REJECTED.labels(status="413").inc()
            await _answer(send, 413, _TOO_LARGE)
            return
        if body is None:
            return  # nobody to answer
        signed = next((value for name, value in scope["headers"] if name == b"stripe-signature"), None)
        signature = None if signed is None else signed.decode("latin-1")
        status, answer = await answer_delivery_from_loop(body, signature, self.engine, self.settings, self.deliveries)
        await _answer(send, status, json.dumps(answer).encode())
