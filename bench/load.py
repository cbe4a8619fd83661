"""A keep-alive HTTP load generator that can also pace (wrk cannot): worker processes, each running
asyncio connections that write pre-built requests and read the answers by Content-Length. Raw
sockets, not http.client, so that the generator takes as little as it can of the cores it shares
with the server (http.client cost ~0.46 ms of CPU per request, a quarter of a core at 500/s).
Prints nothing; returns latencies to bench/run.py."""

from __future__ import annotations

import asyncio
import time
from multiprocessing import Pool
from typing import Any

Result = tuple[float, int]  # (seconds, HTTP status)


def _request(port: int, body: bytes, signature: str) -> bytes:
    head = (
        f"POST /webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Stripe-Signature: {signature}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, the server closes the connection)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = int(head.split(" ", 2)[1])
    length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)
    await reader.readexactly(length)
    return status, "connection: close" in head


async def _connection(
    port: int, requests: list[bytes], interval: float, deadline: float, results: list[Result]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    next_send = time.perf_counter()
    for request in requests:
        if interval:
            next_send += interval
            await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
        if time.perf_counter() > deadline:
            break
        started = time.perf_counter()
        writer.write(request)
        status, closing = await _answer(reader)
        results.append((time.perf_counter() - started, status))
        if closing:
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


def _process(args: tuple[int, list[list[bytes]], float, float]) -> tuple[list[Result], float]:
    port, per_connection, interval, seconds = args
    results: list[Result] = []

    async def main() -> float:
        started = time.perf_counter()
        await asyncio.gather(
            *(_connection(port, requests, interval, started + seconds, results) for requests in per_connection)
        )
        return time.perf_counter() - started

    return results, asyncio.run(main())


def run(
    port: int, bodies: list[tuple[bytes, str]], connections: int, processes: int, rate: float | None, seconds: float
) -> tuple[list[float], int, float]:
    """(latencies, non-2xx answers, wall seconds). With `rate`, sends at that many events/s in all."""
    requests = [_request(port, body, signature) for body, signature in bodies]
    per_connection = [requests[i::connections] for i in range(connections)]
    interval = connections / rate if rate else 0.0
    chunks = [(port, per_connection[i::processes], interval, seconds) for i in range(processes)]
    with Pool(processes) as pool:
        outputs: list[Any] = pool.map(_process, chunks)
    results = [item for chunk, _ in outputs for item in chunk]
    wall = max(elapsed for _, elapsed in outputs)
    latencies = [latency for latency, _ in results]
    errors = sum(1 for _, status in results if not 200 <= status < 300)
    return latencies, errors, wall
