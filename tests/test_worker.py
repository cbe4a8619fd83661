"""The buffered worker's reading of one request, without a server: when a request is whole by the
HTTP parser's own account, and what is answered from the event loop (tests/test_slow_clients.py
drives the same against gunicorn with raw sockets)."""

from __future__ import annotations

import pytest

from webhook.worker import BAD_REQUEST, HEADER_LIMIT, HEADERS_TOO_LARGE, TOO_LARGE, _Reading

LIMIT = 1000
HEAD = b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n"


def _fed(*parts: bytes) -> tuple[_Reading, bytes | None]:
    reading, error = _Reading(LIMIT), None
    for part in parts:
        error = reading.feed(part)
    return reading, error


@pytest.mark.parametrize(
    "parts",
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",),
        (HEAD + b"Content-Length: 5\r\n\r\n", b"hel", b"lo"),
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",),
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /again HTTP/1.1\r\n",),  # a second request half-sent behind
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n",),  # the one behind is gunicorn's to refuse
    ],
)
def test_whole_requests(parts: tuple[bytes, ...]) -> None:
    reading, error = _fed(*parts)
    assert error is None and reading.request.complete


@pytest.mark.parametrize(
    "parts",
    [
        (HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\n[10\r\n\r\n",),  # ends like a last chunk, is not one
        (HEAD + b"Content-Length: 10\r\n\r\n12345",),
        (HEAD + b"Content-Le",),
        (b"",),
    ],
)
def test_requests_still_coming(parts: tuple[bytes, ...]) -> None:
    reading, error = _fed(*parts)
    assert error is None and not reading.request.complete


def test_what_is_answered_from_the_loop() -> None:
    assert _fed(HEAD + b"X-Filler: " + b"a" * HEADER_LIMIT)[1] is HEADERS_TOO_LARGE
    assert _fed(HEAD + b"Content-Length: 1001\r\n\r\n")[1] is TOO_LARGE  # declared, nothing sent yet
    assert _fed(HEAD + b"Transfer-Encoding: chunked\r\n\r\n", b"3e9\r\n" + b"a" * 1001)[1] is TOO_LARGE
    assert _fed(b"GARBAGE\r\n\r\n")[1] is BAD_REQUEST
    assert _fed(HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")[1] is BAD_REQUEST
    assert BAD_REQUEST.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in BAD_REQUEST


def test_expect_100_continue_is_seen_once_the_headers_are_in() -> None:
    reading, error = _fed(HEAD + b"Expect: 100-continue\r\nContent-Length: 5\r\n")
    assert error is None and reading.request.expects_continue and not reading.request.headers_done
    reading.feed(b"\r\n")
    assert reading.request.headers_done and not reading.request.complete
