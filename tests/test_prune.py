"""prune: retention of the event log, beside live deliveries, with the deletions still remembered."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.server import gunicorn, post_event
from tests.support import SECRET, cli, count, customer_row, deliver, now
from webhook import samples

STATUSES = "SELECT status, count(*) FROM stripe_webhook_events GROUP BY status ORDER BY status"


def _age_every_event(engine: Engine, days: int) -> None:
    with engine.connect() as connection:
        connection.execute(
            text("UPDATE stripe_webhook_events SET received_at = now() - make_interval(days => :d)"), {"d": days}
        )


def test_prune_keeps_failed_events_tombstones_and_says_what_it_did(
    client: FlaskClient, engine: Engine, database_url: str
) -> None:
    customer = samples.customer()
    base = now() - 200 * 86400
    for event in (
        samples.event("customer.created", customer, created=base),
        samples.event("customer.deleted", customer, created=base + 10),
        samples.event("customer.created", samples.customer(), created=base + 20),
    ):
        assert deliver(client, event).status_code == 200
    with engine.connect() as connection:
        connection.execute(
            text(
                "INSERT INTO stripe_webhook_events (id, type, created, payload, status) VALUES "
                "('evt_Failed', 'customer.updated', now(), '{}', 'failed'), "
                "('evt_Received', 'customer.updated', now(), '{}', 'received')"
            )
        )
    _age_every_event(engine, 120)
    env = {"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": SECRET}
    before = count(engine, "SELECT count(*) FROM stripe_webhook_events")

    dry = cli("prune", "--dry-run", **env)
    assert dry.returncode == 0 and dry.stdout.startswith("would prune 3 settled events"), dry.stdout
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == before

    refused = cli("prune", "--older-than", "2h", **env)
    assert refused.returncode == 2 and "nothing deleted" in refused.stderr
    kept_forever = cli("prune", **env, EVENT_RETENTION_DAYS="0")
    assert "nothing pruned" in kept_forever.stdout

    pruned = cli("prune", **env)  # EVENT_RETENTION_DAYS: 90 by default
    assert pruned.returncode == 0 and pruned.stdout.startswith("pruned 3 settled events"), pruned.stdout
    with engine.connect() as connection:
        assert connection.execute(text(STATUSES)).all() == [("failed", 1), ("received", 1)]
    # The deletion's event is gone; its tombstone still refuses an older update of that customer.
    stale = samples.event("customer.updated", {**customer, "name": "Back from the dead"}, created=base + 5)
    assert deliver(client, stale).get_json()["status"] == "stale"
    assert customer_row(engine, customer["id"]) is None


@pytest.mark.reliability  # slow (a long wait by design): beside the soak, not in the default run
def test_pruning_100000_events_beside_live_deliveries(database_url: str, engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(
            text(
                "INSERT INTO stripe_webhook_events "
                "(id, type, created, payload, status, received_at, stripe_customer_id) "
                "SELECT 'evt_old' || n, 'customer.updated', now() - interval '200 days', "
                "jsonb_build_object('id', 'evt_old' || n, 'data', jsonb_build_object('object', jsonb_build_object("
                "'id', 'cus_old' || (n % 5000), 'email', 'someone@example.com', 'name', repeat('x', 400)))), "
                "'processed', now() - interval '200 days', 'cus_old' || (n % 5000) FROM generate_series(1, 100000) AS n"
            )
        )
    stop, latencies = threading.Event(), []

    def deliveries(port: int) -> None:
        while not stop.is_set():
            started = time.monotonic()
            status, _ = post_event(port, samples.event("customer.created", samples.customer()))
            latencies.append(time.monotonic() - started)
            assert status == 200

    with gunicorn(database_url, workers=2) as (port, _), ThreadPoolExecutor(max_workers=4) as pool:
        clients = [pool.submit(deliveries, port) for _ in range(4)]
        time.sleep(1)
        started = time.monotonic()
        pruned = cli("prune", DATABASE_URL=database_url, STRIPE_WEBHOOK_SECRET=SECRET)
        took = time.monotonic() - started
        stop.set()
        for delivering in clients:
            delivering.result()
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(
        f"\npruned 100,000 events in {took:.1f} s beside {len(latencies)} deliveries: "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, slowest {latencies[-1] * 1000:.1f} ms"
    )
    assert pruned.stdout.startswith("pruned 100000 settled events"), pruned.stdout + pruned.stderr
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE id LIKE 'evt_old%'") == 0
    assert latencies[-1] < 1.0  # nothing waited behind the prune (machine noise aside: see the printed figures)


def test_a_progress_bar_on_a_terminal_and_only_the_summary_otherwise(database_url: str, engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(
            text(
                "INSERT INTO stripe_webhook_events (id, type, created, payload, status, received_at) "
                "SELECT 'evt_bar' || n, 'customer.updated', now(), '{}', 'processed', now() - interval '200 days' "
                "FROM generate_series(1, 3000) AS n"
            )
        )
    env = {**os.environ, "DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": SECRET}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has no width
    with subprocess.Popen(
        [sys.executable, "-m", "webhook", "prune"], env=env, stdout=subprocess.PIPE, stderr=follower
    ) as pruning:
        os.close(follower)
        terminal = b""
        with contextlib.suppress(OSError):  # EIO once the child has closed its end
            while chunk := os.read(leader, 4096):
                terminal += chunk
        summary = pruning.stdout.read().decode()  # type: ignore[union-attr]
    os.close(leader)
    assert summary.startswith("pruned 3000 settled events")
    assert b"\rprune: " in terminal and b"events" in terminal, terminal[-300:]  # tqdm's bar, on stderr

    piped = cli("prune", "--dry-run", DATABASE_URL=database_url, STRIPE_WEBHOOK_SECRET=SECRET)
    assert piped.stderr == "" and piped.stdout.startswith("would prune 0 settled events")
