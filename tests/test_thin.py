"""Thin events from an event destination, beside snapshot events: applied from what Stripe says of
the object now (the fake Stripe over HTTP), stamped with Stripe's clock; both versions of one change
end in one state and one audited change; and the answers when there is no key or Stripe is down."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.fake_stripe import FakeStripe
from tests.support import count, customer_row, deliver, event_row, now, settings_for
from webhook import samples
from webhook.app import create_app

T = now() - 3600


@pytest.fixture
def stripe_api() -> Iterator[tuple[FakeStripe, str]]:
    fake = FakeStripe()
    with fake.serving() as base:
        yield fake, base


@pytest.fixture
def keyed(stripe_api: tuple[FakeStripe, str], database_url: str, engine: Engine) -> FlaskClient:
    _, base = stripe_api
    settings = settings_for(database_url, STRIPE_API_KEY="sk_test_fake", STRIPE_API_BASE=base)
    return create_app(settings, engine).test_client()


def _answer(client: FlaskClient, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    answer = deliver(client, event)
    return answer.status_code, answer.get_json()


def test_a_thin_event_applies_what_stripe_says_now(
    keyed: FlaskClient, stripe_api: tuple[FakeStripe, str], engine: Engine
) -> None:
    fake, _ = stripe_api
    customer = fake.add_customer(name="Now in Stripe", created=T)
    fake.clock = T + 30
    notification = samples.thin_event("v1.customer.updated", customer["id"], created=T + 29, context="acct_123")
    assert _answer(keyed, notification) == (200, {"event_id": notification["id"], "status": "processed"})
    row = customer_row(engine, customer["id"])
    assert row is not None and row["customer_name"] == "Now in Stripe"
    sync = row["customer_metadata"]["sync"]
    assert (sync["source"], sync["event_created"]) == ("thin", T + 30)  # Stripe's clock, not the notification's
    logged = event_row(engine, notification["id"])
    assert logged is not None and logged["status"] == "processed" and logged["stripe_customer_id"] == customer["id"]
    # A snapshot event older than the read is stale afterwards; a newer one applies.
    older = samples.event("customer.updated", {**customer, "name": "Older"}, created=T + 20)
    assert _answer(keyed, older)[1]["status"] == "stale"
    newer = samples.event("customer.updated", {**customer, "name": "Newer"}, created=T + 31)
    assert _answer(keyed, newer)[1]["status"] == "processed"


@pytest.mark.parametrize("snapshot_first", [True, False], ids=["snapshot then thin", "thin then snapshot"])
def test_the_snapshot_and_thin_versions_of_one_change_end_in_one_state_and_one_audit_row(
    keyed: FlaskClient, stripe_api: tuple[FakeStripe, str], engine: Engine, snapshot_first: bool
) -> None:
    fake, _ = stripe_api
    customer = fake.add_customer(name="Renamed", created=T)
    fake.clock = T + 10
    snapshot = samples.event("customer.updated", customer, created=T + 10)
    notification = samples.thin_event("v1.customer.updated", customer["id"], created=T + 10)
    for event in (snapshot, notification) if snapshot_first else (notification, snapshot):
        assert _answer(keyed, event)[0] == 200
    row = customer_row(engine, customer["id"])
    assert row is not None and row["customer_name"] == "Renamed"
    audit = "SELECT count(*) FROM stripe_customers_audit WHERE stripe_customer_id = :c"
    assert count(engine, audit, c=customer["id"]) == 1  # the row's creation; the second read changed nothing


def test_a_thin_event_for_a_deleted_customer_deletes_it_with_a_tombstone(
    keyed: FlaskClient, stripe_api: tuple[FakeStripe, str], engine: Engine
) -> None:
    fake, _ = stripe_api
    customer = samples.customer(created=T)
    assert _answer(keyed, samples.event("customer.created", customer, created=T))[1]["status"] == "processed"
    fake.deleted.add(customer["id"])
    fake.clock = T + 40
    assert _answer(keyed, samples.thin_event("v1.customer.deleted", customer["id"]))[1]["status"] == "processed"
    assert customer_row(engine, customer["id"]) is None
    late = samples.event("customer.updated", customer, created=T + 39)
    assert _answer(keyed, late)[1]["status"] == "stale"


def test_thin_subscription_and_entitlement_events(
    keyed: FlaskClient, stripe_api: tuple[FakeStripe, str], engine: Engine
) -> None:
    fake, _ = stripe_api
    subscription = samples.subscription("cus_Thin1", status="past_due")
    fake.subscriptions[subscription["id"]] = subscription
    thin = samples.thin_event("v1.customer.subscription.past_due", subscription["id"])
    assert _answer(keyed, thin)[1]["status"] == "processed"
    with engine.connect() as connection:
        status = connection.execute(
            text("SELECT status FROM stripe_subscriptions WHERE stripe_subscription_id = :s"), {"s": subscription["id"]}
        ).scalar_one()
    assert status == "past_due"
    # An entitlement summary's notification names no object: the event names the customer.
    summary = samples.thin_event("v1.entitlements.active_entitlement_summary.updated", None)
    fake.v2_events[summary["id"]] = {"id": summary["id"], "object": "v2.core.event", "data": {"customer": "cus_Thin1"}}
    fake.entitlements["cus_Thin1"] = [{"id": "ent_1", "feature": "feat_1", "lookup_key": "pro"}]
    assert _answer(keyed, summary)[1]["status"] == "processed"
    assert count(engine, "SELECT count(*) FROM stripe_entitlements WHERE stripe_customer_id = 'cus_Thin1'") == 1


def test_pings_and_unhandled_thin_types_are_ignored(keyed: FlaskClient, engine: Engine) -> None:
    for notification in (
        samples.thin_event("v2.core.event_destination.ping", None),
        samples.thin_event("v1.invoice.paid", "in_123"),
    ):
        status, answer = _answer(keyed, notification)
        assert (status, answer.get("status")) == (200, "ignored"), answer
        assert event_row(engine, notification["id"])["status"] == "ignored"  # type: ignore[index]


def test_only_a_v1_path_of_the_stripe_api_is_ever_read(keyed: FlaskClient, engine: Engine) -> None:
    for url in (
        "https://evil.example/v1/customers/cus_1",
        "/v1/customers/../../admin",
        "/v1/customers/cus_1?x=1",
        "//evil/v1/x",
    ):
        notification = samples.thin_event("v1.customer.updated", "cus_1")
        notification["related_object"]["url"] = url
        status, answer = _answer(keyed, notification)
        assert status == 400 and "not a /v1/ path" in answer["error"], url
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == 0


def test_without_a_key_a_thin_event_fails_until_replayed(client: FlaskClient, engine: Engine) -> None:
    notification = samples.thin_event("v1.customer.updated", "cus_NoKey1")
    status, answer = _answer(client, notification)
    assert status == 500 and answer["event_id"] == notification["id"]
    logged = event_row(engine, notification["id"])
    assert logged is not None and logged["status"] == "failed" and "need STRIPE_API_KEY" in logged["last_error"]


def test_stripe_down_answers_503_and_keeps_the_event_then_the_retry_applies(
    keyed: FlaskClient, stripe_api: tuple[FakeStripe, str], engine: Engine
) -> None:
    fake, _ = stripe_api
    customer = fake.add_customer(name="After the outage", created=T)
    fake.failures = [(500, {"error": {"type": "api_error", "message": "down"}})] * 3
    notification = samples.thin_event("v1.customer.updated", customer["id"])
    status, answer = _answer(keyed, notification)
    assert status == 503 and answer["event_id"] == notification["id"]
    assert event_row(engine, notification["id"])["status"] == "received"  # type: ignore[index]
    assert customer_row(engine, customer["id"]) is None
    fake.failures = []
    assert _answer(keyed, notification)[1]["status"] == "processed"  # Stripe's retry
    assert customer_row(engine, customer["id"])["customer_name"] == "After the outage"  # type: ignore[index]
    assert json.loads(json.dumps(event_row(engine, notification["id"])["payload"]))["object"] == "v2.core.event"  # type: ignore[index]
