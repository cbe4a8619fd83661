"""The operations (README, "Operating it") against a fake Stripe API (mocked at the HTTP layer) and a real Postgres."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import stripe
from flask.testing import FlaskClient
from sqlalchemy import Engine

from tests.fake_stripe import FakeStripe
from tests.support import (
    SECRET,
    add_user,
    cli,
    count,
    customer_row,
    deliver,
    event_row,
    failing_writes,
    now,
    settings_for,
)
from webhook import samples, stripe_api
from webhook.backfill import backfill
from webhook.cli import main as cli_main
from webhook.config import ConfigError, Keys
from webhook.customers import UnknownUser, ensure_customer, push_profile
from webhook.objects.customer import CUSTOMER
from webhook.reconcile import find_drift, fix_drift
from webhook.replay import replay_from_stripe, replay_stored

API_KEY = "sk_test_fake"
SOURCE_COUNT = "SELECT count(*) FROM stripe_customers WHERE customer_metadata #>> '{sync,source}' = :source"


@pytest.fixture
def api_settings(database_url: str) -> Any:
    return settings_for(database_url, STRIPE_API_KEY=API_KEY)


@pytest.fixture
def client_api(api_settings: Any) -> stripe.StripeClient:
    return stripe_api.make_client(api_settings)


def test_backfill_pages_through_every_customer(
    fake: FakeStripe, engine: Engine, client: FlaskClient, client_api: stripe.StripeClient
) -> None:
    user_id = add_user(engine)
    linked = fake.add_customer(metadata={"user_id": user_id})
    others = [fake.add_customer(email=f"c{i}@example.com") for i in range(249)]
    # A row an event set after the backfill started: the backfill must not overwrite it.
    newer = samples.event("customer.updated", {**others[0], "name": "From a newer event"}, created=now() + 60)
    deliver(client, newer)

    with fake.mocked():
        outcomes = backfill(engine, client_api, Keys()).outcomes["customer"]

    assert outcomes == {"processed": 249, "stale": 1}
    assert sum(1 for method, path in fake.requests if path == "/v1/customers") == 3  # 100 + 100 + 50
    assert count(engine, "SELECT count(*) FROM stripe_customers") == 250
    assert count(engine, SOURCE_COUNT, source="backfill") == 249
    assert str(customer_row(engine, linked["id"])["user_id"]) == user_id  # type: ignore[index]
    assert customer_row(engine, others[0]["id"])["customer_name"] == "From a newer event"  # type: ignore[index]
    # And an event older than the backfill's snapshot no longer applies.
    older = samples.event("customer.updated", {**others[1], "name": "Old"}, created=now() - 3600)
    assert deliver(client, older).get_json()["status"] == "stale"


def test_backfill_stopped_by_a_429_storm_says_so_and_resumes(
    fake: FakeStripe, engine: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    for i in range(250):
        fake.add_customer(email=f"c{i}@example.com")
    monkeypatch.setattr(stripe_api, "RATE_LIMITED", stripe_api.RATE_LIMITED.new(backoff_factor=0))
    for name, value in {
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_API_KEY": fake.api_key,
    }.items():
        monkeypatch.setenv(name, value)
    rate_limited = (429, {"error": {"type": "rate_limit_error", "message": "Too many requests"}})
    fake.failures, fake.fail_from = [rate_limited] * 6, 2  # two pages, then more 429s than the retries
    with fake.mocked():
        assert cli_main(["backfill"]) == 1
    said = capsys.readouterr()
    assert said.out.startswith("backfilled 200 customers: 200 written")
    assert "rate limit" in said.err and "run backfill again to resume after cus_" in said.err
    assert count(engine, "SELECT count(*) FROM stripe_customers") == 200  # the pages in hand were kept

    fake.requests = []
    with fake.mocked():
        assert cli_main(["backfill"]) == 0
    assert capsys.readouterr().out.startswith("backfilled 50 customers (resumed after cus_")
    # The customers' last page only; then the subscriptions (none: no entitlements to read).
    assert fake.requests == [("GET", "/v1/customers"), ("GET", "/v1/subscriptions")]
    assert count(engine, "SELECT count(*) FROM stripe_customers") == 250
    assert count(engine, "SELECT count(*) FROM stripe_sync_cursors") == 0  # finished: the next run starts over


def _failed_event(client: FlaskClient, engine: Engine) -> dict[str, Any]:
    event = samples.event("customer.created", samples.customer())
    with failing_writes(engine, "public.stripe_customers", "BEFORE"):
        assert deliver(client, event).status_code == 500
    return event


def test_replay_reruns_failed_events_through_the_same_path(
    client: FlaskClient, engine: Engine, api_settings: Any
) -> None:
    failed = _failed_event(client, engine)
    processed = samples.event("customer.created", samples.customer())
    deliver(client, processed)

    summary = replay_stored(engine, api_settings, event_id=None, status="failed", since_seconds=None)

    assert summary.outcomes == {"processed": 1} and summary.failed == 0
    assert event_row(engine, failed["id"])["status"] == "processed"  # type: ignore[index]
    assert customer_row(engine, failed["data"]["object"]["id"])["customer_metadata"]["sync"]["source"] == "replay"  # type: ignore[index]
    again = replay_stored(engine, api_settings, event_id=processed["id"], status="failed", since_seconds=None)
    assert again.outcomes == {"duplicate": 1}


def test_replay_from_stripe_processes_only_what_the_log_lacks(
    fake: FakeStripe, client: FlaskClient, engine: Engine, api_settings: Any, client_api: stripe.StripeClient
) -> None:
    delivered = samples.event("customer.created", samples.customer(), created=now() - 600)
    deliver(client, delivered)
    missed = [samples.event("customer.created", samples.customer(), created=now() - 500 + i) for i in range(120)]
    too_old = samples.event("customer.created", samples.customer(), created=now() - 80 * 3600)
    fake.events = [delivered, *missed, too_old, samples.event_of_type("charge.succeeded")]

    with fake.mocked():
        summary = replay_from_stripe(engine, api_settings, client_api, since=now() - 72 * 3600)

    assert summary.outcomes == {"processed": 120} and summary.skipped == 1
    assert count(engine, SOURCE_COUNT, source="replay") == 120
    assert event_row(engine, too_old["id"]) is None


def test_verify_reports_drift_and_fix_applies_stripe_state(
    fake: FakeStripe, client: FlaskClient, engine: Engine, client_api: stripe.StripeClient
) -> None:
    same, changed, deleted = (fake.add_customer(email=f"{n}@example.com", name=n) for n in ("same", "changed", "gone"))
    missing = samples.customer(email="missing@example.com")
    for customer in (same, changed, deleted, missing):
        deliver(client, samples.event("customer.created", customer, created=now() - 100))
    fake.customers[changed["id"]]["email"] = "new@example.com"
    fake.delete_customer(deleted["id"])

    with fake.mocked():
        checked, drifts = find_drift(engine, client_api, Keys())
        lines = sorted(drift.line() for drift in drifts)

        assert checked == 4
        assert lines == sorted(
            [
                f"drift {changed['id']}: changed (email differ)",
                f"drift {deleted['id']}: deleted",
                f"drift {missing['id']}: missing",
            ]
        )
        assert not any("@" in line for line in lines)  # drift lines never print emails

        assert fix_drift(engine, drifts, now()) == ["processed"] * 3
        assert find_drift(engine, client_api, Keys()) == (2, [])
    row = customer_row(engine, changed["id"])
    assert row is not None and row["customer_email"] == "new@example.com"
    assert row["customer_metadata"]["sync"]["source"] == "api"
    assert customer_row(engine, deleted["id"]) is None and customer_row(engine, missing["id"]) is None


def test_ensure_customer_creates_once_even_when_called_concurrently(
    fake: FakeStripe, engine: Engine, client_api: stripe.StripeClient
) -> None:
    user_id = add_user(engine, email="buyer@example.com")

    with fake.mocked():
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda _: ensure_customer(engine, client_api, user_id, Keys()), range(4)))
        assert len(set(results)) == 1
        calls_after_create = len(fake.requests)
        assert ensure_customer(engine, client_api, user_id, Keys()) == results[0]
        assert len(fake.requests) == calls_after_create  # an existing row needs no Stripe call

    assert len(fake.customers) == 1
    created = fake.customers[results[0]]
    assert created["email"] == "buyer@example.com" and created["metadata"] == {"user_id": user_id}
    row = customer_row(engine, results[0])
    assert row is not None and str(row["user_id"]) == user_id
    assert count(engine, "SELECT count(*) FROM stripe_customers") == 1


def test_ensure_customer_for_an_unknown_user(fake: FakeStripe, engine: Engine, client_api: stripe.StripeClient) -> None:
    with fake.mocked(), pytest.raises(UnknownUser):
        ensure_customer(engine, client_api, "9b2f3c1e-0000-4000-8000-000000000000", Keys())
    assert fake.customers == {}


def test_push_profile_sends_the_change_to_stripe(
    fake: FakeStripe, client: FlaskClient, engine: Engine, client_api: stripe.StripeClient
) -> None:
    user_id = add_user(engine)
    customer = fake.add_customer(metadata={"user_id": user_id}, name="Old Name")
    deliver(client, samples.event("customer.created", customer))

    with fake.mocked():
        assert push_profile(engine, client_api, user_id, name="New Name") == customer["id"]

    assert fake.customers[customer["id"]]["name"] == "New Name"
    assert ("POST", f"/v1/customers/{customer['id']}") in fake.requests


def _listed(client: stripe.StripeClient) -> list[Any]:
    return list(CUSTOMER.listing(stripe_api.reader(client), Keys()))


def test_stripe_errors(
    fake: FakeStripe, engine: Engine, api_settings: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="STRIPE_API_KEY"):
        stripe_api.make_client(settings_for(database_url))
    client_api = stripe_api.make_client(api_settings)
    server_error = (500, {"error": {"type": "api_error", "message": "Something went wrong"}})
    fake.failures = [server_error] * 3
    with fake.mocked(), pytest.raises(stripe.APIError) as raised:
        _listed(client_api)
    assert len(fake.requests) == 3  # the library's retries, then the error
    assert stripe_api.explain(raised.value) == "Stripe API error (HTTP 500)"
    fake.failures = [server_error]
    with fake.mocked():
        assert [c.id for c in _listed(client_api)] == []  # one retry recovered
    # Stripe's 429 asks for backoff and a retry, which the library does not do by itself.
    rate_limited = (429, {"error": {"type": "invalid_request_error", "message": "Too many requests"}})
    fake.failures, fake.requests = [rate_limited] * 2, []
    with fake.mocked():
        assert [c.id for c in _listed(client_api)] == []
    assert len(fake.requests) == 3
    monkeypatch.setattr(stripe_api, "RATE_LIMITED", stripe_api.RATE_LIMITED.new(backoff_factor=0))
    fake.failures, fake.requests = [rate_limited] * 7, []
    with fake.mocked(), pytest.raises(stripe.RateLimitError) as limited:
        _listed(stripe_api.make_client(api_settings))
    assert len(fake.requests) == 6  # the first try and five retries
    assert "rate limit" in stripe_api.explain(limited.value)


def test_cli_against_a_fake_stripe_server(fake: FakeStripe, engine: Engine, database_url: str) -> None:
    env = {"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": SECRET}
    assert (
        cli("backfill", **env).returncode,
        cli("backfill", **env).stderr.strip(),
    ) == (2, "error: STRIPE_API_KEY is required for this command")

    user_id = add_user(engine, email="cli@example.com")
    for i in range(3):
        fake.add_customer(email=f"cli{i}@example.com")
    fake.events = [samples.event("customer.created", fake.add_customer(), created=now() - 60)]
    with fake.serving() as base:
        env.update(STRIPE_API_KEY=API_KEY, STRIPE_API_BASE=base)

        recovered = cli("replay", "--from-stripe", "--since", "72h", **env)
        assert (recovered.returncode, recovered.stdout.strip()) == (0, "replayed 1: 1 processed")

        backfilled = cli("backfill", **env)
        assert backfilled.returncode == 0, backfilled.stderr
        assert backfilled.stdout.startswith("backfilled 4 customers")

        ensured = cli("ensure-customer", "--user-id", user_id, **env)
        assert ensured.returncode == 0, ensured.stderr
        assert customer_row(engine, ensured.stdout.strip()) is not None

        unknown = cli("ensure-customer", "--user-id", "9b2f3c1e-0000-4000-8000-000000000000", **env)
        assert unknown.returncode == 1 and "no auth.users row" in unknown.stderr

        clean = cli("verify", **env)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        fake.customers[ensured.stdout.strip()]["name"] = "Changed in the dashboard"
        drifted = cli("verify", **env)
        assert drifted.returncode == 1 and "name differ" in drifted.stdout
        assert "@" not in drifted.stdout
        assert cli("verify", "--fix", **env).returncode == 0
        assert cli("verify", **env).returncode == 0

        bad_key = cli("verify", **{**env, "STRIPE_API_KEY": "sk_test_wrong"})
        assert bad_key.returncode == 2 and "Stripe rejected the API key (HTTP 401)" in bad_key.stderr
        assert "sk_test_wrong" not in bad_key.stderr


def test_replay_cli_summary_and_exit_code(client: FlaskClient, engine: Engine, database_url: str) -> None:
    env = {"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": SECRET}
    bad = samples.event("customer.created", samples.customer("cus_Refused"))
    refused = (engine, "public.stripe_customers", "BEFORE", "NEW.stripe_customer_id = 'cus_Refused'")
    with failing_writes(*refused):
        deliver(client, bad)  # fails for good: the database refuses this customer
    _failed_event(client, engine)  # fails once: the fault is gone by replay time

    with failing_writes(*refused):
        result = cli("replay", **env)

    assert result.returncode == 1
    failed, summary = result.stdout.splitlines()
    assert failed.startswith(f"failed {bad['id']}: ") and "injected failure" in failed
    assert summary == "replayed 2: 1 failed, 1 processed"
    assert event_row(engine, bad["id"])["attempts"] == 2  # type: ignore[index]
    assert cli("replay", "--event", "evt_nope", **env).returncode == 1
    assert cli("replay", "--event", bad["id"], "--since", "24h", **env).returncode == 2
    assert cli("replay", "--since", "soon", **env).returncode == 2
