"""gunicorn's threaded worker, but a connection gets a thread only once its whole request is in
memory. Stock gthread hands a connection to a thread as soon as a byte arrives; a client that sends
its headers and never the body (or half the headers) then holds that thread for ever, and a few
dozen of them stop every delivery. Here the worker's own event loop reads requests without
blocking, and decides that a request is whole by a real HTTP parser's account (httptools, the
llhttp binding uvicorn uses), never by byte patterns a client can fake. A connection that has not
sent a whole request within REQUEST_SECONDS is dropped; one whose headers or body exceed the limits
is answered (431, 413) from the loop and closed; one the parser refuses gets a 400. The threads
read nothing from the socket: they parse the request from memory, so no client can hold one.
Stalled clients cost a socket and a buffer each, up to gunicorn's worker_connections per worker
(see the README for what to put in front)."""

from __future__ import annotations

import json
import os
import selectors
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httptools
from gunicorn import http, util
from gunicorn.http.unreader import Unreader
from gunicorn.workers.gthread import ThreadWorker

from webhook import metrics
from webhook.config import ConfigError, max_webhook_bytes

# Stripe sends each event in one go; a client that takes longer than this for one request is
# stalled or hostile.
REQUEST_SECONDS = 10.0
HEADER_LIMIT = 64 * 1024
# After an error answer, what the client still sends is read and dropped for this long, so that
# closing with unread bytes does not reset the connection before the client has read the answer.
LINGER_SECONDS = 2.0


class _Request:
    """httptools' callbacks for the request being read: how far it has come."""

    def __init__(self) -> None:
        self.headers_done = False
        self.complete = False
        self.content_length = 0
        self.body = 0
        self.expects_continue = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" and value.strip().isdigit():
            self.content_length = int(value)
        elif name == b"expect" and value.strip().lower() == b"100-continue":
            self.expects_continue = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


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


@dataclass
class _Reading:
    """One connection's request as the event loop reads it."""

    body_limit: int
    deadline: float = field(default_factory=lambda: time.monotonic() + REQUEST_SECONDS)
    data: bytearray = field(default_factory=bytearray)
    request: _Request = field(default_factory=_Request)
    registered: bool = False
    continued: bool = False
    parser: Any = None

    def __post_init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self.request)

    def feed(self, received: bytes) -> bytes | None:
        """Take received bytes; the error answer to close with, if any (None: fine so far)."""
        self.data += received
        try:
            self.parser.feed_data(received)
        except httptools.HttpParserUpgrade:
            pass  # the request itself is whole; gunicorn answers it as a plain HTTP/1.1 request
        except httptools.HttpParserError:
            if not self.request.complete:  # an error in a request pipelined behind is gunicorn's to answer
                return BAD_REQUEST
        request = self.request
        if request.complete:
            return None
        if not request.headers_done:
            return HEADERS_TOO_LARGE if len(self.data) > HEADER_LIMIT else None
        if request.content_length > self.body_limit or request.body > self.body_limit:
            return TOO_LARGE
        return None


class _FromMemory(Unreader):  # type: ignore[misc]
    """What the threads parse requests from: the bytes the event loop read, never the socket.
    Running out means the request is over (the loop saw it whole), not a reason to wait."""

    def chunk(self, size_hint: int | None = None) -> bytes:
        return b""


_http_date = util.http_date
_date: list[tuple[int, str]] = [(-1, "")]


def _http_date_of_this_second(timestamp: float | None = None) -> str:
    """gunicorn formats every answer's Date header anew through email.utils; the text changes once
    a second."""
    if timestamp is not None:
        return str(_http_date(timestamp))
    second = int(time.time())
    if _date[0][0] != second:
        _date[0] = (second, str(_http_date(second)))
    return _date[0][1]


class BufferedThreadWorker(ThreadWorker):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reading: dict[Any, _Reading] = {}
        self.lingering: dict[Any, float] = {}  # answered with an error: closed at this time
        try:
            self.body_limit = max_webhook_bytes(os.environ)
        except ConfigError:
            self.body_limit = 0  # the app refuses to start with the same message

    def init_process(self) -> None:
        # In the worker only, not on import: the patch is process-wide.
        util.http_date = _http_date_of_this_second
        super().init_process()

    def enqueue_req(self, conn: Any) -> None:
        if self.cfg.is_ssl:  # TLS is terminated in front of this app; keep gunicorn's own path
            super().enqueue_req(conn)
            return
        reading = self.reading[conn] = _Reading(self.body_limit)
        conn.sock.setblocking(False)
        # Bytes the thread's parser held beyond the last request (a pipelined one) come first;
        # then usually the whole request is there already (a kept-alive connection just turned
        # readable): read it now rather than after another turn of the event loop.
        ahead = conn.parser.unreader.take_buffered() if conn.parser else b""
        if ahead and self._took(conn, reading, ahead):
            return
        self._read(conn, conn.sock)

    def _read(self, conn: Any, sock: Any) -> None:
        reading = self.reading[conn]
        try:
            received = sock.recv(65536)
        except BlockingIOError:
            received = None
        except OSError:
            received = b""
        if received == b"":  # closed, or broken, before a whole request
            self._drop(conn)
            return
        if received is not None and self._took(conn, reading, received):
            return
        if not reading.registered:
            self.poller.register(sock, selectors.EVENT_READ, partial(self._read, conn))
            reading.registered = True

    def _took(self, conn: Any, reading: _Reading, received: bytes) -> bool:
        """Feed received bytes; True when the connection has left the reading state."""
        error = reading.feed(received)
        if error is not None:
            if error is TOO_LARGE:
                metrics.REJECTED.labels(status="413").inc()
            self._answer_and_close(conn, error)
            return True
        request = reading.request
        if request.complete:
            self._stop_reading(conn)
            if conn.parser is None:
                conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
                conn.parser.unreader = _FromMemory()
            conn.parser.unreader.unread(bytes(reading.data))
            conn.data_ready = True
            super().enqueue_req(conn)
            return True
        if request.headers_done and request.expects_continue and not reading.continued:
            # The client waits for this before it sends the body; gunicorn sends its own once the
            # request is parsed, and HTTP clients accept more than one 1xx answer.
            reading.continued = True
            try:
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                self._drop(conn)
                return True
        return False

    def _answer_and_close(self, conn: Any, answer: bytes) -> None:
        self._stop_reading(conn)
        try:
            conn.sock.send(answer)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.nr_conns -= 1
            conn.close()
            return
        self.lingering[conn] = time.monotonic() + LINGER_SECONDS
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._discard, conn))

    def _discard(self, conn: Any, sock: Any) -> None:
        try:
            more = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            more = b""
        if not more:
            self._close_lingering(conn)

    def _close_lingering(self, conn: Any) -> None:
        del self.lingering[conn]
        self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        conn.close()

    def _stop_reading(self, conn: Any) -> None:
        if self.reading.pop(conn).registered:
            self.poller.unregister(conn.sock)

    def _drop(self, conn: Any) -> None:
        self._stop_reading(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn in [conn for conn, reading in self.reading.items() if reading.deadline < now]:
            self._drop(conn)
        for conn in [conn for conn, deadline in self.lingering.items() if deadline < now]:
            self._close_lingering(conn)
