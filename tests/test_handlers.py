"""What each handled event type asks of the customer table, without a database."""

from __future__ import annotations

import uuid

import pytest

from webhook import samples
from webhook.config import Keys
from webhook.objects import HANDLERS, BadCustomerId
from webhook.objects.customer import state as customer_state
from webhook.objects.customer import user_link
from webhook.signature import RejectedDelivery


def test_a_customer_object_as_the_upsert_it_implies() -> None:
    user = str(uuid.uuid4())
    customer = samples.customer(
        email="a@example.com", name="A", metadata={"user_id": user, "plan": "pro"}, default_payment_method="pm_1"
    )
    change = customer_state(customer, Keys())
    assert (change.action, change.id, change.email, change.name) == ("upsert", customer["id"], "a@example.com", "A")
    assert (change.default_payment_method, change.metadata, change.user_id, change.note) == (
        "pm_1",
        {"user_id": user, "plan": "pro"},
        user,
        None,
    )


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"workspace": "9B2F3C1E-0000-4000-8000-000000000000"}, ("9b2f3c1e-0000-4000-8000-000000000000", None, None)),
        ({"workspace": "acme"}, (None, "metadata.workspace is not a UUID", "metadata.user_id has no user id")),
        ({}, (None, None, "metadata.user_id has no user id")),  # billing no organization is no fault
    ],
)
def test_the_organization_a_customer_bills(metadata: dict[str, str], expected: tuple[str | None, ...]) -> None:
    change = customer_state(samples.customer(metadata=metadata), Keys(organization_id="workspace"))
    assert (change.organization_id, change.organization_note, change.note) == expected


def test_expanded_objects_and_odd_values() -> None:
    customer = {
        **samples.customer(email=None, name=None),
        "invoice_settings": {"default_payment_method": {"id": "pm_expanded", "object": "payment_method"}},
        "metadata": "not a dict",
    }
    change = customer_state(customer, Keys())
    assert (change.email, change.name, change.default_payment_method, change.metadata) == (
        None,
        None,
        "pm_expanded",
        {},
    )
    assert change.note == "metadata.user_id has no user id"


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        (None, (None, "x has no user id")),
        ("", (None, "x has no user id")),
        ("not-a-uuid", (None, "x is not a UUID")),
        ("6F1C0E52-0B8A-4B1E-9C3A-2D6A1B9F0C11", ("6f1c0e52-0b8a-4b1e-9c3a-2d6a1b9f0c11", None)),
    ],
)
def test_user_links(candidate: object, expected: tuple[str | None, str | None]) -> None:
    assert user_link(candidate, "x") == expected


@pytest.mark.parametrize("bad", [None, "", "sub_123", "cus_", "cus_bad-id", 42, {"id": "cu_1"}])
def test_a_customer_event_without_a_cus_id_is_bad_input(bad: object) -> None:
    for event_type in ("customer.created", "customer.updated", "customer.deleted"):
        with pytest.raises(BadCustomerId):
            HANDLERS[event_type]({"id": bad}, Keys())


def test_deletion_and_checkout() -> None:
    deleted = HANDLERS["customer.deleted"]({"id": "cus_Gone1"}, Keys())
    assert deleted is not None and (deleted.action, deleted.id) == ("delete", "cus_Gone1")
    user = str(uuid.uuid4())
    session = samples.checkout_session("cus_Buyer1", user, email="b@example.com", name="B")
    linked = HANDLERS["checkout.session.completed"](session, Keys())
    assert linked is not None and (linked.action, linked.id, linked.user_id, linked.email) == (
        "link",
        "cus_Buyer1",
        user,
        "b@example.com",
    )
    # A payment-mode session without a customer, or one started without the app's user: nothing.
    assert HANDLERS["checkout.session.completed"]({**session, "customer": None}, Keys()) is None
    assert HANDLERS["checkout.session.completed"]({**session, "client_reference_id": None}, Keys()) is None


@pytest.mark.parametrize("new_period_shape", [False, True])
def test_a_subscription_as_the_change_it_implies(new_period_shape: bool) -> None:
    subscription = samples.subscription(
        "cus_Unit1",
        status="past_due",
        prices=[
            {**samples.price("pro"), "metadata": {"tier": "gold", "plan": "platinum"}},
            samples.price("addon", tier=None),
        ],
        period_end=1_800_000_000,
        new_period_shape=new_period_shape,
    )
    change = HANDLERS["customer.subscription.updated"](subscription, Keys())
    assert change is not None and change.as_json()["object"] == "subscription"
    assert (change.id, change.customer, change.status, change.current_period_end) == (  # type: ignore[union-attr]
        subscription["id"],
        "cus_Unit1",
        "past_due",
        1_800_000_000,
    )
    assert [item["tier"] for item in change.items] == ["gold", None]  # type: ignore[union-attr]
    assert change.created == subscription["created"]  # type: ignore[union-attr]
    # The tier metadata key is configurable.
    other = HANDLERS["customer.subscription.updated"](subscription, Keys(tier="plan"))
    assert [item["tier"] for item in other.items] == ["platinum", None]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"id": "si_123", "status": "active", "customer": "cus_1"}, "no sub_"),
        ({"id": "sub_1", "status": "frozen", "customer": "cus_1"}, "no known status"),
        ({"id": "sub_1", "status": "active", "customer": None}, "cus_"),
    ],
)
def test_a_subscription_without_its_ids_or_a_known_status_is_bad_input(broken: dict[str, object], reason: str) -> None:
    """Each refused for its own reason: everything else about it is well-formed."""
    with pytest.raises(RejectedDelivery, match=reason):
        HANDLERS["customer.subscription.updated"]({"object": "subscription", **broken}, Keys())


def test_an_entitlement_summary_and_whether_it_is_complete() -> None:
    handler = HANDLERS["entitlements.active_entitlement_summary.updated"]
    few = handler(samples.entitlement_summary("cus_Unit2", ["pro", "export"]), Keys())
    assert few is not None and few.complete and [e["lookup_key"] for e in few.entitlements] == ["pro", "export"]  # type: ignore[union-attr]
    many = handler(samples.entitlement_summary("cus_Unit2", [f"f{n}" for n in range(12)]), Keys())
    assert many is not None and not many.complete and len(many.entitlements) == 10  # type: ignore[union-attr]
