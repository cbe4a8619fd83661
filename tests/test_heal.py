"""heal: recovery from the Events API, one worker at a time, takeover, rate limit, Stripe storms and
reconciliation; against a fake Stripe over real HTTP and `heal` as a subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.fake_stripe import FakeStripe
from tests.support import KEY, SECRET, cli, configured, count, customer_row, deliver, failing_writes, now, settings_for
from webhook import samples, stripe_api
from webhook.budget import Budget
from webhook.heal import Healer


def _env(database_url: str, base: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_API_KEY": KEY,
        "STRIPE_API_BASE": base,
        "RECONCILE_INTERVAL": "0",
        **extra,
    }


def _missed(fake: FakeStripe, how_many: int, start: int | None = None) -> list[dict[str, Any]]:
    start = start or now() - 3600
    events = [
        samples.event("customer.created", samples.customer(email=f"m{i}@example.com"), created=start + i)
        for i in range(how_many)
    ]
    fake.events.extend(events)
    return events


def _heal(*args: str, **env: str) -> subprocess.Popen[str]:
    """`heal` in the background; its log (a line per event) goes nowhere, so it never blocks on a
    full pipe; what it prints on stdout is read at the end."""
    return subprocess.Popen(
        [sys.executable, "-m", "webhook", "heal", *args],
        env=configured(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_heal_recovers_missed_events_and_a_second_round_finds_nothing(
    fake: FakeStripe, stripe_http: str, client: FlaskClient, engine: Engine, database_url: str
) -> None:
    events = _missed(fake, 5)
    for delivered in events[:2]:
        assert deliver(client, delivered).status_code == 200
    first = cli("heal", "--once", **_env(database_url, stripe_http))
    assert first.returncode == 0, first.stderr
    assert "recovered 3 events" in first.stdout
    for event in events:
        assert customer_row(engine, event["data"]["object"]["id"]) is not None
    second = cli("heal", "--once", **_env(database_url, stripe_http))
    assert "recovered 0 events" in second.stdout, second.stdout
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == 5


def test_two_heal_processes_at_once_apply_each_event_once_and_fetch_each_page_once(
    fake: FakeStripe, stripe_http: str, engine: Engine, database_url: str
) -> None:
    _missed(fake, 250)  # three pages
    fake.gate.clear()  # Stripe holds its first answer until the second process has tried
    first = _heal("--once", **_env(database_url, stripe_http))
    try:
        deadline = time.monotonic() + 30
        while not fake.requests:
            assert time.monotonic() < deadline, "the first heal never asked Stripe"
            time.sleep(0.05)
        second = _heal("--once", **_env(database_url, stripe_http))
        assert "another heal process holds the lease" in second.communicate(timeout=60)[0]
    finally:
        fake.gate.set()
    assert "recovered 250 events" in first.communicate(timeout=60)[0]
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == 250
    assert fake.requests.count(("GET", "/v1/events")) == 3


@pytest.mark.reliability  # slow (a long wait by design): beside the soak, not in the default run
def test_a_killed_heal_is_taken_over_and_heal_stops_on_sigterm(
    fake: FakeStripe, stripe_http: str, engine: Engine, database_url: str
) -> None:
    _missed(fake, 600)  # six pages, a second each
    fake.delay = 1.0
    env = _env(database_url, stripe_http, HEAL_INTERVAL="3s")
    first = _heal(**env)
    deadline = time.monotonic() + 30
    while fake.requests.count(("GET", "/v1/events")) < 2:
        assert time.monotonic() < deadline, "the first heal never listed events"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    applied_by_first = count(engine, "SELECT count(*) FROM stripe_webhook_events")
    second = _heal(**env)
    try:
        deadline = time.monotonic() + 60
        while count(engine, "SELECT count(*) FROM stripe_webhook_events") < 600:
            assert time.monotonic() < deadline, "the second heal did not take over"
            time.sleep(0.5)
    finally:
        fake.delay = 0
        stopping = time.monotonic()
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=20)
    print(f"\nfirst heal applied {applied_by_first} before SIGKILL; the second finished the round")
    assert second.returncode == 0 and time.monotonic() - stopping < 5
    assert count(engine, "SELECT count(DISTINCT id) FROM stripe_webhook_events") == 600


def test_background_stripe_traffic_stays_under_the_rate(
    fake: FakeStripe, stripe_http: str, engine: Engine, database_url: str
) -> None:
    for i in range(1500):
        fake.add_customer(email=f"r{i}@example.com")
    result = cli("backfill", **_env(database_url, stripe_http, STRIPE_API_RATE="5"))
    assert result.returncode == 0, result.stderr
    times = fake.request_times
    busiest = max(sum(1 for t in times if start <= t < start + 1) for start in times)
    print(f"\n{len(times)} list requests over {times[-1] - times[0]:.1f} s; busiest second: {busiest}")
    assert len(times) == 16 and busiest <= 5  # 15 pages of customers, one of subscriptions


def test_a_stripe_storm_fails_the_round_and_the_next_succeeds(
    fake: FakeStripe, engine: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch, client: FlaskClient
) -> None:
    monkeypatch.setattr(stripe_api, "RATE_LIMITED", stripe_api.RATE_LIMITED.new(backoff_factor=0))
    settings = settings_for(database_url, STRIPE_API_KEY=KEY, RECONCILE_INTERVAL="0")
    healer = Healer(engine, settings, stripe_api.make_client(settings, Budget(engine, settings.stripe_api_rate)))
    _missed(fake, 3)
    for storm in (
        [(500, {"error": {"type": "api_error", "message": "down"}})] * 3,
        [(429, {"error": {"type": "rate_limit_error", "message": "slow down"}})] * 6,
    ):
        fake.failures = list(storm)
        with fake.mocked():
            failed = healer.run_round()
        assert failed is not None and failed.error, failed
        assert "stripe_heal_last_round_failed 1.0" in client.get("/metrics").get_data(as_text=True)
    with fake.mocked():
        recovered = healer.run_round()
    assert recovered is not None and recovered.error is None and recovered.recovered == 3
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "stripe_heal_last_round_failed 0.0" in metrics
    assert "stripe_heal_last_round_recovered_events 3.0" in metrics


def test_reconciliation_fixes_a_hand_edit_and_a_silent_deletion(
    fake: FakeStripe, stripe_http: str, engine: Engine, database_url: str
) -> None:
    kept, gone = fake.add_customer(email="kept@example.com"), fake.add_customer(email="gone@example.com")
    for i in range(10):
        fake.add_customer(email=f"other{i}@example.com")
    assert cli("backfill", **_env(database_url, stripe_http)).returncode == 0
    with engine.connect() as connection:
        connection.execute(
            text("UPDATE stripe_customers SET customer_email = 'typo@example.com' WHERE stripe_customer_id = :c"),
            {"c": kept["id"]},
        )
    fake.delete_customer(gone["id"])  # deleted in Stripe, and no event says so

    result = cli("heal", "--once", **_env(database_url, stripe_http, RECONCILE_INTERVAL="1s"))
    assert "drift 2 found, 2 fixed" in result.stdout, result.stdout + result.stderr
    assert customer_row(engine, kept["id"])["customer_email"] == "kept@example.com"  # type: ignore[index]
    assert customer_row(engine, gone["id"]) is None


def test_metrics_show_failed_events_and_the_last_processed_event(
    client: FlaskClient, engine: Engine, database_url: str
) -> None:
    assert deliver(client, samples.event("customer.created", samples.customer())).status_code == 200
    with engine.connect() as connection:
        connection.execute(
            text(
                "INSERT INTO stripe_webhook_events (id, type, created, payload, status, received_at) "
                "VALUES ('evt_failed_old', 'customer.updated', now(), '{}', 'failed', now() - interval '2 hours')"
            )
        )
    metrics = client.get("/metrics").get_data(as_text=True)
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line[:1] != "#"}
    assert lines["stripe_webhook_failed_events"] == 1
    assert 7190 < lines["stripe_webhook_oldest_failed_event_age_seconds"] < 7300
    assert lines["stripe_webhook_seconds_since_last_processed_event"] < 60


def test_heal_stops_within_seconds_while_stripe_is_slow(
    fake: FakeStripe, stripe_http: str, engine: Engine, database_url: str
) -> None:
    _missed(fake, 10)
    fake.delay = 25.0  # one answer takes longer than a stop may
    healer = _heal(**_env(database_url, stripe_http, HEAL_INTERVAL="3s"))
    try:
        deadline = time.monotonic() + 30
        while not fake.requests:
            assert time.monotonic() < deadline, "heal never asked Stripe"
            time.sleep(0.1)
        stopping = time.monotonic()
        healer.send_signal(signal.SIGTERM)
        healer.wait(timeout=20)
        took = time.monotonic() - stopping
    finally:
        fake.delay = 0
        healer.kill()
    print(f"\nheal stopped {took:.1f} s after SIGTERM, mid-round")
    assert healer.returncode == 0 and took < 6
    # The lease is released: another process may take the round at once.
    assert count(engine, "SELECT count(*) FROM stripe_sync_cursors WHERE name = 'heal_lease'") == 0


def test_malformed_items_of_the_events_list_are_reported_as_skipped(
    fake: FakeStripe, stripe_http: str, engine: Engine, database_url: str
) -> None:
    good = _missed(fake, 2)
    fake.events.append({"id": "evt_malformed", "object": "event", "type": "customer.created", "created": now()})
    result = cli("heal", "--once", **_env(database_url, stripe_http))
    assert result.returncode == 0, result.stderr
    assert "recovered 2 events; skipped 1 malformed items" in result.stdout
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == len(good)


def test_a_429_is_tried_again_after_stripes_retry_after(
    fake: FakeStripe, stripe_http: str, engine: Engine, database_url: str
) -> None:
    fake.add_customer()
    fake.failures = [(429, {"error": {"type": "rate_limit_error", "message": "slow down"}})]
    fake.retry_after = 3
    verified = cli("verify", **_env(database_url, stripe_http))
    assert verified.returncode == 0 and "checked 0 rows" in verified.stdout, verified.stderr  # past the 429
    first, second = fake.request_times[:2]
    assert fake.requests[:2] == [("GET", "/v1/customers")] * 2
    assert second - first >= 2.9  # waited as long as Stripe asked, not the backoff's first 0 s


def test_heal_reports_the_recovered_events_that_failed(
    fake: FakeStripe, stripe_http: str, engine: Engine, database_url: str, client: FlaskClient
) -> None:
    events = _missed(fake, 4)
    doomed = events[1]["data"]["object"]["id"]
    with failing_writes(engine, "stripe_customers", "BEFORE", f"NEW.stripe_customer_id = '{doomed}'"):
        healed = cli("heal", "--once", **_env(database_url, stripe_http))
    assert healed.returncode == 0, healed.stderr
    assert "recovered 4 events (1 failed)" in healed.stdout, healed.stdout
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status = 'failed'") == 1
    assert "stripe_heal_last_round_recovered_events 4.0" in client.get("/metrics").get_data(as_text=True)
