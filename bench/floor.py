"""The HTTP layer's floor: a verify-only app (read the body, verify_header, answer JSON) under each
server tried for the consumer, same load as bench.run (wrk, 16 connections, ~2.5 KB signed events),
median of --rounds. Figures, not assertions: `python -m bench.floor`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from bench import run
from webhook.serving import gunicorn_command


def servers(port: int, workers: int) -> list[tuple[str, str, list[str]]]:
    bind = f"127.0.0.1:{port}"
    quiet = ("--workers", str(workers), "--log-level", "warning")
    granian = [sys.executable, "-m", "granian", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    return [
        (
            "gunicorn gthread ×8 threads, Flask (the layer before)",
            "bench.baseline:create_app()",
            gunicorn_command(
                bind, *quiet, "--worker-class", "gthread", "--threads", "8", app="bench.baseline:create_app()"
            ),
        ),
        (
            "gunicorn + guarded uvicorn worker (uvloop, httptools), ASGI",
            "bench.baseline:create_asgi()",
            gunicorn_command(bind, *quiet, app="bench.baseline:create_asgi()"),
        ),
        (
            "granian, ASGI",
            "bench.baseline:create_asgi",
            [*granian, "--interface", "asgi", "--loop", "uvloop", "--factory", "bench.baseline:create_asgi"],
        ),
        (
            "granian, WSGI (blocking threads)",
            "bench.baseline:create_app",
            [*granian, "--interface", "wsgi", "--factory", "bench.baseline:create_app"],
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    env = {
        **os.environ,
        "STRIPE_WEBHOOK_SECRET": run.SECRET,
        "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-metrics-"),
    }
    rows: list[dict[str, Any]] = []
    port = run._free_port()
    for name, app, command in servers(port, args.workers):
        server = run._serve(app, port, env, args.workers, command=command)
        try:
            row = run._saturate(name, port, server, args, None)
            row.pop("_customers")
            rows.append(row)
        finally:
            server.terminate()
            server.wait()
        print(run._table(rows[-1:]), flush=True)
    print(run._table(rows))


if __name__ == "__main__":
    main()
