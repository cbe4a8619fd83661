"""A real gunicorn server on loopback for tests that need worker processes."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.support import SECOND_SECRET, SECRET, sign
from webhook.serving import gunicorn_command


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(url: str, seconds: float) -> None:
    """Poll url until it answers 200."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


@contextmanager
def gunicorn(database_url: str, workers: int = 2, **env: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A server on a free port; its log goes to the file SERVER_LOG names, when set (debugging)."""
    port = free_port()
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": f"{SECRET},{SECOND_SECRET}",
        "PROMETHEUS_MULTIPROC_DIR": "",
        **env,
    }
    environment.pop("PROMETHEUS_MULTIPROC_DIR")  # each server gets a fresh one from gunicorn_conf
    process = subprocess.Popen(
        gunicorn_command(f"127.0.0.1:{port}", "--workers", str(workers), "--log-level", "warning"),
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=open(os.environ["SERVER_LOG"], "a") if os.environ.get("SERVER_LOG") else subprocess.DEVNULL,  # noqa: SIM115
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", 30)
        yield port, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def post_event(port: int, event: dict[str, Any], timeout: float = 15) -> tuple[int, dict[str, Any]]:
    body = json.dumps(event)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/webhooks/stripe", body, {"Stripe-Signature": sign(body)})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()
