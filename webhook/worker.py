"""gunicorn's threaded worker, but a connection gets a thread only once its whole request is in
memory. Stock gthread hands a connection to a thread as soon as a byte arrives; a client that sends
its headers and never the body (or half the headers) then holds that thread for ever, and 2 workers
× 4 threads of them stop every delivery. Here the worker's own event loop reads requests without
blocking, and drops a connection that has not sent a whole request within REQUEST_SECONDS; the
threads only ever see complete requests. Stalled clients cost a socket and a buffer each, up to
gunicorn's worker_connections per worker (see the README for what to put in front)."""

from __future__ import annotations

import re
import selectors
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn import http, util
from gunicorn.workers.gthread import ThreadWorker

# Stripe sends each event in one go; a client that takes longer than this for one request is
# stalled or hostile.
REQUEST_SECONDS = 10.0
# Requests larger than this are handed over once their headers are in; the app answers 413 for
# anything above its limit without reading the body.
BUFFER_LIMIT = 1024 * 1024
HEADER_LIMIT = 64 * 1024
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
_EXPECT_CONTINUE = re.compile(rb"\r\nexpect:[ \t]*100-continue", re.IGNORECASE)


def request_complete(data: bytes) -> bool:
    """Whether data holds a whole HTTP/1.x request, or as much as this worker waits for."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return len(data) > HEADER_LIMIT  # gunicorn's parser refuses it
    head, body = data[: end + 2], len(data) - end - 4
    if _CHUNKED.search(head):
        return data.endswith(b"0\r\n\r\n") or body > BUFFER_LIMIT
    length = _CONTENT_LENGTH.search(head)
    wanted = int(length.group(1)) if length else 0
    return body >= wanted or wanted > BUFFER_LIMIT


_http_date = util.http_date
_date: list[tuple[int, str]] = [(-1, "")]


def _http_date_of_this_second(timestamp: float | None = None) -> str:
    """gunicorn formats every answer's Date header anew through email.utils (~3% of a worker's CPU
    under load, py-spy); the text changes once a second."""
    if timestamp is not None:
        return str(_http_date(timestamp))
    second = int(time.time())
    if _date[0][0] != second:
        _date[0] = (second, str(_http_date(second)))
    return _date[0][1]


util.http_date = _http_date_of_this_second


@dataclass
class _Reading:
    data: bytearray
    deadline: float
    registered: bool = False


class BufferedThreadWorker(ThreadWorker):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reading: dict[Any, _Reading] = {}

    def enqueue_req(self, conn: Any) -> None:
        if self.cfg.is_ssl:  # TLS is terminated in front of this app; keep gunicorn's own path
            super().enqueue_req(conn)
            return
        # Bytes the parser read ahead (a pipelined request) come first.
        ahead = conn.parser.unreader.take_buffered() if conn.parser else b""
        self.reading[conn] = _Reading(bytearray(ahead), time.monotonic() + REQUEST_SECONDS)
        conn.sock.setblocking(False)
        # Usually the whole request is there already (a kept-alive connection just turned
        # readable): read it now rather than after another turn of the event loop.
        self._read(conn, conn.sock)

    def _read(self, conn: Any, sock: Any) -> None:
        reading = self.reading[conn]
        had_head = b"\r\n\r\n" in reading.data
        try:
            received = sock.recv(65536)
        except BlockingIOError:
            received = None
        except OSError:
            received = b""
        reading.data += received or b""
        data = bytes(reading.data)
        complete = request_complete(data)
        if received == b"" and not complete:  # closed, or broken, before a whole request
            self._drop(conn)
            return
        if complete:
            self._stop_reading(conn)
            if conn.parser is None:
                conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.parser.unreader.unread(data)
            conn.data_ready = True
            super().enqueue_req(conn)
            return
        head, ended, _ = data.partition(b"\r\n\r\n")
        if ended and not had_head and _EXPECT_CONTINUE.search(head):
            # The client waits for this before it sends the body; gunicorn sends its own once the
            # request is parsed, and HTTP clients accept more than one 1xx answer.
            try:
                sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                self._drop(conn)
                return
        if not reading.registered:
            self.poller.register(sock, selectors.EVENT_READ, partial(self._read, conn))
            reading.registered = True

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
