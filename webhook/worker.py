"""The gunicorn worker: uvicorn's event loop (uvloop, and httptools, the llhttp binding, as the one
HTTP parser) serving the ASGI app of webhook/asgi.py, with the guards uvicorn leaves out.

No thread reads a socket: the loop reads every request, and the app has a delivery's body whole
before anything that blocks sees it, so a client that stalls holds a socket and a buffer, never a
thread. uvicorn itself gives a connection unlimited time for its headers and body and any size of
headers; here a connection that has not sent a whole request within REQUEST_SECONDS is dropped
(from its connect or its previous answer), and one whose headers or body exceed the limits is
answered (431, 413) at once and closed, as is one the parser refuses (400). Those answers are
followed by a half-close and a short linger that reads and drops what the client still sends, so
that closing with unread bytes does not reset the connection before the client has read the answer.
Stalled clients cost a socket each, up to gunicorn's worker_connections per worker (see the README
for what to put in front)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from flask import Flask
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn_worker import UvicornWorker

from webhook import metrics
from webhook.config import DEFAULT_MAX_WEBHOOK_BYTES, Settings

# Stripe sends each event in one go; a client that takes longer than this for one request is
# stalled or hostile.
REQUEST_SECONDS = 10.0
HEADER_LIMIT = 64 * 1024
LINGER_SECONDS = 2.0


def _answer(status: int, reason: str, error: str) -> bytes:
    body = json.dumps({"error": error}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


BAD_REQUEST = _answer(400, "Bad Request", "bad request")
HEADERS_TOO_LARGE = _answer(431, "Request Header Fields Too Large", "request header fields too large")
TOO_LARGE = _answer(413, "Request Entity Too Large", "request entity too large")


class _HeadWithBody:
    """A request's view of its connection in which the answer's head waits for its body: uvicorn
    writes them with a send each, two system calls and two wake-ups of the reader where one does.
    Whatever else is written (a 100 Continue) goes at once."""

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self.transport = transport
        self.cycle = cycle
        self.head: bytes | None = None
        self.answered = cycle.on_response
        cycle.on_response = self.done

    def write(self, data: bytes) -> None:
        if self.head is None and self.cycle.response_started:
            self.head = data  # the first write once the answer has started is its head
            return
        if self.head:
            data, self.head = self.head + data, b""
        self.transport.write(data)

    def flush(self) -> None:
        if self.head:
            self.transport.write(self.head)
            self.head = b""

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def done(self) -> None:
        self.flush()
        self.answered()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request and limits on its size."""

    body_limit = DEFAULT_MAX_WEBHOOK_BYTES  # the app's MAX_WEBHOOK_BYTES once loaded (Worker.load_wsgi)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline: asyncio.TimerHandle | None = None
        self.in_head = True  # between requests, or reading one's headers
        self.head_bytes = 0  # received while in this request's headers
        self.body_bytes = 0
        self.finished_one = False  # a request ended in the bytes being parsed
        self.receiving = False  # a request has begun and is not whole yet
        self.stopping = False
        self.refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(REQUEST_SECONDS, self._too_slow)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _too_slow(self) -> None:
        self.deadline = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._arm()  # a whole request is being answered; a pipelined one behind it waits its turn
            return
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # lingering after an error answer: read and dropped
        if self.in_head and self.deadline is None:
            self._arm()  # the first bytes of a kept-alive connection's next request
        self.finished_one = False
        super().data_received(data)
        if self.in_head and not self.refused:
            # Bytes of a request that ended in this read are not the next one's headers.
            self.head_bytes = 0 if self.finished_one else self.head_bytes + len(data)
            if self.head_bytes > HEADER_LIMIT:
                self._refuse(HEADERS_TOO_LARGE)

    def shutdown(self) -> None:
        """The worker is stopping (a deploy, a restart): uvicorn closes every connection between
        answers, a freshly accepted one too, whose request is on its way and would be reset. Here
        only a kept-alive connection at rest is closed; a request begun or about to come is read,
        answered and then the connection closed (within REQUEST_SECONDS, as always)."""
        self.stopping = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            if cycle is not None and not self.receiving and not self.pipeline:
                self.transport.close()
            return
        cycle.keep_alive = False

    def on_message_begin(self) -> None:
        self.receiving = True
        super().on_message_begin()

    def send_400_response(self, msg: str) -> None:
        self._refuse(BAD_REQUEST)

    def on_headers_complete(self) -> None:
        if self.refused:
            return
        self.in_head, self.head_bytes, self.body_bytes = False, 0, 0
        declared = next((value for name, value in self.headers if name == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.body_limit:
            self._refuse(TOO_LARGE)
            return
        super().on_headers_complete()
        self.cycle.transport = _HeadWithBody(self.transport, self.cycle)  # type: ignore[assignment]
        if self.stopping:
            self.cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return
        self.body_bytes += len(body)
        if self.body_bytes > self.body_limit:
            self._refuse(TOO_LARGE)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        self._disarm()  # whole: what the app does with it has its own timeouts
        self.in_head, self.finished_one, self.receiving = True, True, False
        super().on_message_complete()

    def _refuse(self, answer: bytes) -> None:
        """Answer from the loop, half-close, and drop what still comes for LINGER_SECONDS."""
        if self.refused:
            return
        self.refused = True
        if answer is TOO_LARGE:
            metrics.REJECTED.labels(status="413").inc()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app stops waiting for a body that will not come
            cycle.message_event.set()
        self._disarm()
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def eof_received(self) -> None:
        if self.refused:
            self.transport.close()


class Worker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "uvloop",
        "http": GuardedProtocol,
        "lifespan": "off",
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,  # nothing here reads the client's address
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Stopping, the worker finishes what it holds within gunicorn's graceful_timeout.
        self.config.timeout_graceful_shutdown = self.cfg.graceful_timeout

    def load_wsgi(self) -> None:
        super().load_wsgi()
        loaded: Any = self.wsgi  # type: ignore[has-type]
        if isinstance(loaded, Flask) and "webhook" in loaded.extensions:
            from webhook.asgi import App  # the app's modules load in the worker, not the master

            self.wsgi = loaded = App(loaded)
        settings = getattr(loaded, "settings", None)
        if isinstance(settings, Settings):  # one process, one app: the limit its settings read
            GuardedProtocol.body_limit = settings.max_webhook_bytes
