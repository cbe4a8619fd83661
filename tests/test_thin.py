"""Thin events from an event destination, beside snapshot events: applied from what Stripe says of
the object now (the fake Stripe over HTTP), stamped with Stripe's clock; both versions of one change
end in one state and one audited change; and the answers when there is no key or Stripe is down."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.fake_stripe import FakeStripe
from tests.support import count, customer_row, deliver, event_row, now, read_waiting
from webhook import samples
from webhook.budget import Budget
from webhook.config import Settings
from webhook.replay import replay_stored
from webhook.thin_queue import Reader

T = now() - 3600


def _answer(client: FlaskClient, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    answer = deliver(client, event)
    return answer.status_code, answer.get_json()


@pytest.fixture
def settled(keyed: FlaskClient, keyed_settings: Settings, engine: Engine) -> Any:
    """Deliver a thin notification (answered 200 queued), let the readers read it, and say what
    the log then holds for it."""

    def run(notification: dict[str, Any]) -> str:
        assert _answer(keyed, notification) == (200, {"event_id": notification["id"], "status": "queued"})
        read_waiting(engine, keyed_settings)
        return str(event_row(engine, notification["id"])["status"])  # type: ignore[index]

    return run


def test_a_thin_event_applies_what_stripe_says_now(
    keyed: FlaskClient, settled: Any, fake: FakeStripe, engine: Engine
) -> None:
    customer = fake.add_customer(name="Now in Stripe", created=T)
    fake.clock = T + 30
    notification = samples.thin_event("v1.customer.updated", customer["id"], created=T + 29, context="acct_123")
    assert settled(notification) == "processed"
    assert fake.contexts[-1] == "acct_123"  # the notification's context, sent as Stripe-Context
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
    keyed: FlaskClient, settled: Any, fake: FakeStripe, engine: Engine, snapshot_first: bool
) -> None:
    customer = fake.add_customer(name="Renamed", created=T)
    fake.clock = T + 10
    snapshot = samples.event("customer.updated", customer, created=T + 10)
    notification = samples.thin_event("v1.customer.updated", customer["id"], created=T + 10)
    for event in (snapshot, notification) if snapshot_first else (notification, snapshot):
        if event is notification:
            assert settled(event) in ("processed", "stale")
        else:
            assert _answer(keyed, event)[0] == 200
    row = customer_row(engine, customer["id"])
    assert row is not None and row["customer_name"] == "Renamed"
    audit = "SELECT count(*) FROM stripe_customers_audit WHERE stripe_customer_id = :c"
    assert count(engine, audit, c=customer["id"]) == 1  # the row's creation; the second read changed nothing


def test_a_thin_event_for_a_deleted_customer_deletes_it_with_a_tombstone(
    keyed: FlaskClient, settled: Any, fake: FakeStripe, engine: Engine
) -> None:
    customer = samples.customer(created=T)
    assert _answer(keyed, samples.event("customer.created", customer, created=T))[1]["status"] == "processed"
    fake.deleted.add(customer["id"])
    fake.clock = T + 40
    assert settled(samples.thin_event("v1.customer.deleted", customer["id"])) == "processed"
    assert customer_row(engine, customer["id"]) is None
    late = samples.event("customer.updated", customer, created=T + 39)
    assert _answer(keyed, late)[1]["status"] == "stale"


def test_thin_subscription_and_entitlement_events(settled: Any, fake: FakeStripe, engine: Engine) -> None:
    subscription = samples.subscription("cus_Thin1", status="past_due")
    fake.subscriptions[subscription["id"]] = subscription
    thin = samples.thin_event("v1.customer.subscription.past_due", subscription["id"])
    assert settled(thin) == "processed"
    with engine.connect() as connection:
        status = connection.execute(
            text("SELECT status FROM stripe_subscriptions WHERE stripe_subscription_id = :s"), {"s": subscription["id"]}
        ).scalar_one()
    assert status == "past_due"
    # An entitlement summary's notification names no object: the event names the customer.
    summary = samples.thin_event("v1.entitlements.active_entitlement_summary.updated", None)
    fake.v2_events[summary["id"]] = {"id": summary["id"], "object": "v2.core.event", "data": {"customer": "cus_Thin1"}}
    fake.entitlements["cus_Thin1"] = [{"id": "ent_1", "feature": "feat_1", "lookup_key": "pro"}]
    assert settled(summary) == "processed"
    assert count(engine, "SELECT count(*) FROM stripe_entitlements WHERE stripe_customer_id = 'cus_Thin1'") == 1


def test_a_subscription_read_whose_items_end_apart_takes_the_latest_end(
    settled: Any, fake: FakeStripe, engine: Engine
) -> None:
    """API 2025-03-31 and on: the period is on the items; several ending apart, the latest wins."""
    prices = [samples.price("pro_monthly"), samples.price("seats", tier=None)]
    subscription = samples.subscription("cus_Thin2", prices=prices, new_period_shape=True)
    for item, end in zip(subscription["items"]["data"], (T + 86400, T + 3 * 86400), strict=True):
        item["current_period_end"] = end
    fake.subscriptions[subscription["id"]] = subscription
    assert settled(samples.thin_event("v1.customer.subscription.updated", subscription["id"])) == "processed"
    with engine.connect() as connection:
        end = connection.execute(
            text("SELECT extract(epoch FROM current_period_end)::bigint FROM stripe_subscriptions")
        ).scalar_one()
    assert end == T + 3 * 86400


def test_pings_and_unhandled_thin_types_are_ignored(keyed: FlaskClient, engine: Engine) -> None:
    for notification in (
        samples.thin_event("v2.core.event_destination.ping", None),
        samples.thin_event("v1.charge.succeeded", "ch_123"),
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


def _metrics(client: FlaskClient) -> dict[str, float]:
    """The unlabelled samples. Split on newlines only: a label value (an event type another test
    sent) may hold characters str.splitlines() also breaks on, such as U+001E or U+2028."""
    text_format = client.get("/metrics").get_data(as_text=True)
    return {
        line.split()[0]: float(line.split()[1])
        for line in text_format.split("\n")
        if line and not line.startswith("#") and "{" not in line.split()[0]
    }


def _waiting(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM stripe_thin_waiting ORDER BY object_key"))
        return [dict(row._mapping) for row in rows]


def _due_now(engine: Engine) -> None:
    """As if the back-off had passed."""
    with engine.connect() as connection:
        connection.execute(text("UPDATE stripe_thin_waiting SET not_before = now()"))


def test_stripe_down_keeps_the_notification_waiting_then_a_later_read_applies_it(
    keyed: FlaskClient, keyed_settings: Settings, fake: FakeStripe, engine: Engine
) -> None:
    customer = fake.add_customer(name="After the outage", created=T)
    fake.failures = [(500, {"error": {"type": "api_error", "message": "down"}})] * 2
    notification = samples.thin_event("v1.customer.updated", customer["id"])
    assert _answer(keyed, notification) == (200, {"event_id": notification["id"], "status": "queued"})
    for attempt in (1, 2):
        assert read_waiting(engine, keyed_settings) == 1
        assert read_waiting(engine, keyed_settings) == 0  # backing off: not due again yet
        [waiting] = _waiting(engine)
        assert waiting["attempts"] == attempt and "HTTP 500" in waiting["last_error"]
        assert event_row(engine, notification["id"])["status"] == "received"  # type: ignore[index]
        assert customer_row(engine, customer["id"]) is None
        _due_now(engine)
    assert read_waiting(engine, keyed_settings) == 1
    assert event_row(engine, notification["id"])["status"] == "processed"  # type: ignore[index]
    assert customer_row(engine, customer["id"])["customer_name"] == "After the outage"  # type: ignore[index]
    assert _waiting(engine) == []
    assert json.loads(json.dumps(event_row(engine, notification["id"])["payload"]))["object"] == "v2.core.event"  # type: ignore[index]


def test_refused_for_three_days_the_notification_fails_with_the_reason(
    keyed: FlaskClient, keyed_settings: Settings, fake: FakeStripe, engine: Engine
) -> None:
    customer = fake.add_customer(created=T)
    notification = samples.thin_event("v1.customer.updated", customer["id"])
    assert _answer(keyed, notification)[1]["status"] == "queued"
    fake.failures = [(503, {"error": {"type": "api_error", "message": "down"}})] * 2
    with engine.connect() as connection:  # refused since just within Stripe's 3 days: still waits
        connection.execute(text("UPDATE stripe_thin_waiting SET failing_since = now() - interval '71 hours'"))
    read_waiting(engine, keyed_settings)
    assert event_row(engine, notification["id"])["status"] == "received"  # type: ignore[index]
    with engine.connect() as connection:  # ... and past them: failed, for replay
        connection.execute(text("UPDATE stripe_thin_waiting SET failing_since = now() - interval '73 hours'"))
    _due_now(engine)
    read_waiting(engine, keyed_settings)
    logged = event_row(engine, notification["id"])
    assert logged is not None and logged["status"] == "failed"
    assert "3 days" in logged["last_error"] and "HTTP 503" in logged["last_error"]
    assert _waiting(engine) == []


def test_a_404_is_not_a_deletion(keyed: FlaskClient, settled: Any, fake: FakeStripe, engine: Engine) -> None:
    """Stripe answers its own account's key with deleted: true; a 404 means this key cannot see the
    object (another account or mode). The paying customer and their access stay."""
    customer = samples.customer(created=T, name="Paying")
    assert _answer(keyed, samples.event("customer.created", customer, created=T))[1]["status"] == "processed"
    subscription = samples.subscription(customer["id"], status="active")
    assert _answer(keyed, samples.event("customer.subscription.created", subscription, created=T))[0] == 200
    for notification in (
        samples.thin_event("v1.customer.deleted", customer["id"]),
        samples.thin_event("v1.customer.subscription.deleted", subscription["id"]),
    ):
        assert settled(notification) == "failed"
        reason = event_row(engine, notification["id"])["last_error"]  # type: ignore[index]
        assert "404" in reason and "cannot see" in reason
    assert customer_row(engine, customer["id"])["customer_name"] == "Paying"  # type: ignore[index]
    assert count(engine, "SELECT count(*) FROM stripe_subscriptions WHERE status = 'active'") == 1
    assert count(engine, "SELECT count(*) FROM stripe_object_tombstones WHERE object = 'customer'") == 0


def test_notifications_waiting_together_are_served_by_one_read(
    keyed: FlaskClient, keyed_settings: Settings, fake: FakeStripe, engine: Engine
) -> None:
    customer = fake.add_customer(name="Ten times", created=T)
    other = fake.add_customer(name="Once", created=T)
    notifications = [samples.thin_event("v1.customer.updated", customer["id"]) for _ in range(10)]
    for notification in [*notifications, samples.thin_event("v1.customer.updated", other["id"])]:
        assert _answer(keyed, notification)[1]["status"] == "queued"
    assert _answer(keyed, notifications[3])[1]["status"] == "queued"  # Stripe's duplicate: no second read
    before = _metrics(keyed)
    assert before["stripe_thin_waiting"] == 11 and before["stripe_thin_oldest_waiting_age_seconds"] >= 0
    assert read_waiting(engine, keyed_settings) == 2
    after = _metrics(keyed)
    assert after["stripe_thin_waiting"] == 0
    assert after["stripe_api_reads_total"] - before.get("stripe_api_reads_total", 0) == 2
    assert after["stripe_thin_reads_coalesced_total"] - before.get("stripe_thin_reads_coalesced_total", 0) == 9
    reads = [path for _, path in fake.requests]
    assert sorted(reads) == sorted([f"/v1/customers/{customer['id']}", f"/v1/customers/{other['id']}"])
    assert {event_row(engine, n["id"])["status"] for n in notifications} == {"processed"}  # type: ignore[index]
    assert count(engine, "SELECT count(*) FROM stripe_customers_audit") == 2
    assert _answer(keyed, notifications[0])[1]["status"] == "duplicate"  # settled now
    assert read_waiting(engine, keyed_settings) == 0 and len(fake.requests) == 2


def test_a_notification_arriving_during_the_read_waits_for_a_read_of_its_own(
    keyed: FlaskClient, keyed_settings: Settings, fake: FakeStripe, engine: Engine
) -> None:
    """One read serves only notifications that arrived before it was made."""
    customer = fake.add_customer(name="First", created=T)
    first = samples.thin_event("v1.customer.updated", customer["id"])
    assert _answer(keyed, first)[1]["status"] == "queued"
    reader = Reader(engine, keyed_settings, Budget(engine, 20))
    claim = reader.claim()
    assert claim is not None and [e.id for e in claim.events] == [first["id"]]
    later = samples.thin_event("v1.customer.updated", customer["id"])
    assert _answer(keyed, later)[1]["status"] == "queued"  # while the first one is being read
    reader._serve(claim)
    assert event_row(engine, first["id"])["status"] == "processed"  # type: ignore[index]
    assert event_row(engine, later["id"])["status"] == "received"  # type: ignore[index]
    [waiting] = _waiting(engine)
    assert waiting["event_ids"] == [later["id"]] and waiting["holder"] is None
    assert read_waiting(engine, keyed_settings) == 1
    assert event_row(engine, later["id"])["status"] == "processed"  # type: ignore[index]
    assert _waiting(engine) == []


def test_a_lapsed_lease_is_taken_up_by_another_reader(
    keyed: FlaskClient, keyed_settings: Settings, fake: FakeStripe, engine: Engine
) -> None:
    customer = fake.add_customer(name="Taken over", created=T)
    notification = samples.thin_event("v1.customer.updated", customer["id"])
    assert _answer(keyed, notification)[1]["status"] == "queued"
    dead = Reader(engine, keyed_settings, Budget(engine, 20))
    assert dead.claim() is not None  # ... and the process dies holding it
    assert read_waiting(engine, keyed_settings) == 0  # leased: nobody else reads it
    with engine.connect() as connection:
        connection.execute(text("UPDATE stripe_thin_waiting SET leased_until = now() - interval '1 second'"))
    assert read_waiting(engine, keyed_settings) == 1
    assert event_row(engine, notification["id"])["status"] == "processed"  # type: ignore[index]


def test_a_replayed_thin_event_stripe_cannot_answer_is_reported_and_kept(
    keyed: FlaskClient, keyed_settings: Settings, fake: FakeStripe, engine: Engine
) -> None:
    """replay reads a thin event in place: when Stripe answers 5xx it says so in its summary, keeps
    the event as it was (received, still queued), and goes on with the others."""
    customer = fake.add_customer(name="Replayed", created=T)
    notification = samples.thin_event("v1.customer.updated", customer["id"])
    assert _answer(keyed, notification)[1]["status"] == "queued"
    fake.failures = [(503, {"error": {"type": "api_error", "message": "down"}})]
    summary = replay_stored(engine, keyed_settings, event_id=None, status="received", since_seconds=None)
    assert summary.failed == 1 and "Stripe could not be read" in summary.failures[0]
    assert event_row(engine, notification["id"])["status"] == "received"  # type: ignore[index]
    assert [row["event_ids"] for row in _waiting(engine)] == [[notification["id"]]]
    again = replay_stored(engine, keyed_settings, event_id=None, status="received", since_seconds=None)
    assert again.outcomes == {"processed": 1} and customer_row(engine, customer["id"])["customer_name"] == "Replayed"  # type: ignore[index]
