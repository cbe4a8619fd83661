"""A keep-alive HTTP load generator: worker processes, each with threads holding one connection,
posting pre-signed bodies. Prints nothing; returns latencies to bench/run.py."""

from __future__ import annotations

import http.client
import threading
import time
from multiprocessing import Pool
from typing import Any


def _connection_loop(
    port: int, bodies: list[tuple[bytes, str]], interval: float, deadline: float, out: list[Any]
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    next_send = time.perf_counter()
    for body, signature in bodies:
        if interval:
            next_send += interval
            delay = next_send - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        if time.perf_counter() > deadline:
            break
        started = time.perf_counter()
        connection.request(
            "POST", "/webhooks/stripe", body, {"Stripe-Signature": signature, "Content-Type": "application/json"}
        )
        response = connection.getresponse()
        response.read()
        out.append((time.perf_counter() - started, response.status))
        if response.getheader("Connection", "").lower() == "close":
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def _process(args: tuple[int, list[list[tuple[bytes, str]]], float, float]) -> tuple[list[Any], float]:
    port, per_connection, interval, seconds = args
    started = time.perf_counter()
    deadline = started + seconds
    results: list[Any] = []
    threads = [
        threading.Thread(target=_connection_loop, args=(port, bodies, interval, deadline, results))
        for bodies in per_connection
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


def run(
    port: int, bodies: list[tuple[bytes, str]], connections: int, processes: int, rate: float | None, seconds: float
) -> tuple[list[float], int, float]:
    """(latencies, non-2xx answers, wall seconds). With `rate`, sends at that many events/s in all."""
    per_connection = [bodies[i::connections] for i in range(connections)]
    interval = connections / rate if rate else 0.0
    chunks = [(port, per_connection[i::processes], interval, seconds) for i in range(processes)]
    with Pool(processes) as pool:
        outputs = pool.map(_process, chunks)
    results = [item for chunk, _ in outputs for item in chunk]
    wall = max(elapsed for _, elapsed in outputs)
    latencies = [latency for latency, _ in results]
    errors = sum(1 for _, status in results if not 200 <= status < 300)
    return latencies, errors, wall
