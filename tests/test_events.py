"""Event semantics (docs/reference.md): what each event does to stripe_customers, told as deliveries to the real app."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.support import (
    add_user,
    count,
    customer_row,
    deliver,
    event_row,
    failing_writes,
    now,
    settings_for,
)
from webhook import samples
from webhook.app import create_app


def sync_of(row: dict[str, Any] | None) -> dict[str, Any]:
    assert row is not None
    return dict(row["customer_metadata"]["sync"])


def test_customer_created_links_the_user_from_metadata(client: FlaskClient, engine: Engine) -> None:
    user_id = add_user(engine)
    customer = samples.customer(metadata={"user_id": user_id, "plan": "pro"}, default_payment_method="pm_123")
    event = samples.event("customer.created", customer)

    assert deliver(client, event).get_json()["status"] == "processed"

    row = customer_row(engine, customer["id"])
    assert row is not None and str(row["user_id"]) == user_id
    assert row["default_payment_method"] == "pm_123"
    assert row["customer_metadata"]["stripe"] == {"user_id": user_id, "plan": "pro"}
    sync = sync_of(row)
    assert sync["status"] == "synced" and sync["source"] == "webhook" and "note" not in sync
    assert sync["event_id"] == event["id"] and sync["event_created"] == event["created"]
    assert sync["synced_at"].endswith("Z")


def test_expanded_payment_method_and_missing_email(client: FlaskClient, engine: Engine) -> None:
    customer = samples.customer(email=None, name=None)
    customer["invoice_settings"]["default_payment_method"] = {"id": "pm_expanded", "object": "payment_method"}

    assert deliver(client, samples.event("customer.created", customer)).get_json()["status"] == "processed"

    row = customer_row(engine, customer["id"])
    assert row is not None and row["default_payment_method"] == "pm_expanded" and row["customer_email"] is None


@pytest.fixture
def taken_user(engine: Engine, client: FlaskClient) -> Iterator[str]:
    user_id = add_user(engine)
    owner = samples.customer(metadata={"user_id": user_id})
    assert deliver(client, samples.event("customer.created", owner)).get_json()["status"] == "processed"
    yield user_id


@pytest.mark.parametrize(
    "metadata_case, note_part",
    [("none", "has no user id"), ("not_uuid", "not a UUID"), ("unknown", "no auth.users row"), ("taken", "already")],
)
def test_new_customer_that_cannot_be_linked_is_unlinked(
    client: FlaskClient, engine: Engine, request: pytest.FixtureRequest, metadata_case: str, note_part: str
) -> None:
    user_value = {
        "none": None,
        "not_uuid": "user-42",
        "unknown": "7d3f2a7c-8a51-4a8e-9d64-3f2b1c0e9a11",
        "taken": request.getfixturevalue("taken_user") if metadata_case == "taken" else None,
    }[metadata_case]
    customer = samples.customer(metadata={"user_id": user_value} if user_value else {})

    answer = deliver(client, samples.event("customer.created", customer))

    assert answer.get_json()["status"] == "processed"
    row = customer_row(engine, customer["id"])
    assert row is not None and row["user_id"] is None
    sync = sync_of(row)
    assert sync["status"] == "unlinked" and note_part in sync["note"]
    assert "cus_" not in sync["note"]  # never names the customer that holds the user


def test_existing_link_is_kept_when_an_update_cannot_link(client: FlaskClient, engine: Engine) -> None:
    user_id = add_user(engine)
    customer = samples.customer(metadata={"user_id": user_id})
    assert (
        deliver(client, samples.event("customer.created", customer, created=now() - 10)).get_json()["status"]
        == "processed"
    )
    updated = {**customer, "metadata": {"user_id": "not-a-uuid"}, "name": "Renamed"}

    assert deliver(client, samples.event("customer.updated", updated)).get_json()["status"] == "processed"

    row = customer_row(engine, customer["id"])
    assert row is not None and str(row["user_id"]) == user_id and row["customer_name"] == "Renamed"
    assert "not a UUID" in sync_of(row)["note"]


def test_metadata_key_is_configurable(database_url: str, engine: Engine) -> None:
    client = create_app(settings_for(database_url, STRIPE_USER_ID_METADATA_KEY="app_user"), engine).test_client()
    user_id = add_user(engine)
    customer = samples.customer(metadata={"app_user": user_id})

    assert deliver(client, samples.event("customer.created", customer)).get_json()["status"] == "processed"

    assert str(customer_row(engine, customer["id"])["user_id"]) == user_id  # type: ignore[index]


def test_checkout_creates_the_row_and_links_the_user(client: FlaskClient, engine: Engine) -> None:
    user_id = add_user(engine)
    customer_id = samples.stripe_id("cus")
    session = samples.checkout_session(customer_id, user_id, email="buyer@example.com", name="Buyer")

    assert deliver(client, samples.event("checkout.session.completed", session)).get_json()["status"] == "processed"

    row = customer_row(engine, customer_id)
    assert row is not None and str(row["user_id"]) == user_id and row["customer_email"] == "buyer@example.com"
    assert sync_of(row)["status"] == "synced"


def test_checkout_links_an_existing_row_even_when_older(client: FlaskClient, engine: Engine) -> None:
    customer = samples.customer(email="current@example.com")
    assert (
        deliver(client, samples.event("customer.created", customer, created=now())).get_json()["status"] == "processed"
    )
    user_id = add_user(engine)
    session = samples.checkout_session(customer["id"], user_id, email="typed@example.com", name=None)

    answer = deliver(client, samples.event("checkout.session.completed", session, created=now() - 5))

    assert answer.get_json()["status"] == "processed"
    row = customer_row(engine, customer["id"])
    assert row is not None and str(row["user_id"]) == user_id
    assert row["customer_email"] == "current@example.com"  # a checkout carries no customer state
    assert sync_of(row)["status"] == "synced"


def test_checkout_never_moves_a_customer_to_another_user(client: FlaskClient, engine: Engine) -> None:
    owner = add_user(engine)
    customer = samples.customer(metadata={"user_id": owner})
    assert deliver(client, samples.event("customer.created", customer)).get_json()["status"] == "processed"
    intruder = add_user(engine)
    session = samples.checkout_session(customer["id"], intruder, email=None, name=None)

    assert deliver(client, samples.event("checkout.session.completed", session)).get_json()["status"] == "processed"

    assert str(customer_row(engine, customer["id"])["user_id"]) == owner  # type: ignore[index]


def test_checkout_without_customer_or_user_is_ignored(client: FlaskClient, engine: Engine) -> None:
    session = samples.checkout_session(samples.stripe_id("cus"), None, email=None, name=None)
    assert deliver(client, samples.event("checkout.session.completed", session)).get_json()["status"] == "ignored"
    session = samples.checkout_session(samples.stripe_id("cus"), add_user(engine), email=None, name=None)
    session["customer"] = None
    assert deliver(client, samples.event("checkout.session.completed", session)).get_json()["status"] == "ignored"
    assert count(engine, "SELECT count(*) FROM stripe_customers") == 0


def test_audit_names_the_event_and_catches_changes_by_hand(client: FlaskClient, engine: Engine) -> None:
    customer = samples.customer()
    event = samples.event("customer.created", customer)
    assert deliver(client, event).get_json()["status"] == "processed"
    with engine.connect() as connection:
        connection.execute(
            text("UPDATE stripe_customers SET customer_name = 'Support fix' WHERE stripe_customer_id = :id"),
            {"id": customer["id"]},
        )
        audit = connection.execute(
            text("SELECT operation, event_id, changed_by, new_row FROM stripe_customers_audit ORDER BY id")
        ).all()
        current_user = connection.execute(text("SELECT current_user")).scalar_one()

    assert [(entry.operation, entry.event_id) for entry in audit] == [("INSERT", event["id"]), ("UPDATE", None)]
    assert audit[1].changed_by == current_user and audit[1].new_row["customer_name"] == "Support fix"
    row = customer_row(engine, customer["id"])
    assert row is not None and row["updated_at"] > row["created_at"]


def test_a_failing_write_leaves_no_half_write_and_is_retried(client: FlaskClient, engine: Engine) -> None:
    customer = samples.customer()
    event = samples.event("customer.created", customer)
    # A fault inside the event's transaction, after the log row and the customer row were written.
    with failing_writes(engine, "public.stripe_customers_audit", "AFTER"):
        answer = deliver(client, event)

    assert answer.status_code == 500 and answer.get_json()["event_id"] == event["id"]
    logged = event_row(engine, event["id"])
    assert logged is not None and logged["status"] == "failed" and "injected failure" in logged["last_error"]
    assert customer_row(engine, customer["id"]) is None  # the customer write rolled back with the audit's
    assert count(engine, "SELECT count(*) FROM stripe_customers_audit") == 0

    retried = deliver(client, event)  # Stripe's retry, once the fault is gone

    assert retried.get_json()["status"] == "processed"
    logged = event_row(engine, event["id"])
    assert logged is not None and logged["attempts"] == 2 and logged["last_error"] is None
    assert customer_row(engine, customer["id"]) is not None


def test_events_about_a_customers_objects_are_filed_under_the_customer(client: FlaskClient, engine: Engine) -> None:
    customer = samples.customer()
    subscription = samples.subscription(customer["id"])
    card = {"id": samples.stripe_id("card"), "object": "card", "customer": customer["id"]}
    discount = {"id": samples.stripe_id("di"), "object": "discount", "customer": {"id": customer["id"]}}
    events = [
        samples.event("customer.created", customer),
        samples.event("customer.subscription.updated", subscription),
        samples.event("customer.source.created", card),
        samples.event("customer.discount.created", discount),
    ]
    assert [deliver(client, event).get_json()["status"] for event in events] == ["processed"] * 2 + ["ignored"] * 2
    assert [event_row(engine, event["id"])["stripe_customer_id"] for event in events] == [customer["id"]] * 4  # type: ignore[index]


def test_migrate_refiles_events_filed_under_their_objects_id(engine: Engine) -> None:
    from webhook import migrations

    customer_id = samples.stripe_id("cus")
    subscription = {"id": samples.stripe_id("sub"), "object": "subscription", "customer": customer_id}
    event = samples.event("customer.subscription.created", subscription)
    with engine.connect() as connection:
        connection.execute(
            text(
                "INSERT INTO stripe_webhook_events (id, type, created, payload, status, stripe_customer_id) "
                "VALUES (:id, :type, now(), CAST(:payload AS jsonb), 'ignored', :wrong)"
            ),
            {"id": event["id"], "type": event["type"], "payload": json.dumps(event), "wrong": subscription["id"]},
        )
    migrations.migrate(engine, shim=False)
    assert event_row(engine, event["id"])["stripe_customer_id"] == customer_id  # type: ignore[index]
