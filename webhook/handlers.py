"""What each handled Stripe event type asks of the tables, as one registry.

A handler reads the event's data.object and returns the change to apply (a CustomerChange, a
SubscriptionChange or an EntitlementsChange: one per Stripe object, each applied by its own SQL
function under the same ordering rules), or None when the event asks for nothing; types with no
handler are logged as ignored. Handlers only read: every write happens in the database.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from webhook.config import Keys
from webhook.verify import RejectedDelivery

Action = Literal["upsert", "delete", "link"]
CUSTOMER_ID = re.compile(r"cus_[a-zA-Z0-9]+")  # stripe_customers' valid_stripe_id CHECK


class _Change:
    """What every change is to the statement that applies it: a JSON object."""

    __slots__ = ()

    def as_json(self) -> dict[str, Any]:
        # A shallow copy: asdict() deep-copies the metadata, on every event, for json.dumps to read.
        return dict(vars(self))


@dataclass(frozen=True)
class CustomerChange(_Change):
    action: Action
    id: str  # the Stripe customer id, cus_…
    email: str | None = None
    name: str | None = None
    default_payment_method: str | None = None
    metadata: dict[str, Any] | None = None
    user_id: str | None = None  # a well-formed UUID; the database checks it names a free auth.users row
    note: str | None = None  # why no user id could be taken from the event
    organization_id: str | None = None  # the organization it bills: a UUID the database checks likewise
    organization_note: str | None = None  # why the organization id it names cannot be one
    as_of: int | None = None  # unix time of the Stripe read this state comes from (not an event's)
    tie: str | None = None  # "unsettled": apply over a same-second tie nothing could order

    @property
    def customer(self) -> str:
        return self.id


@dataclass(frozen=True)
class SubscriptionChange(_Change):
    id: str  # sub_…
    customer: str  # cus_…
    status: str
    items: list[dict[str, Any]]  # price, product, lookup_key, quantity, tier (the price's tier metadata)
    current_period_end: int | None
    cancel_at_period_end: bool
    cancel_at: int | None
    canceled_at: int | None
    ended_at: int | None
    trial_end: int | None
    metadata: dict[str, Any]
    created: int | None = None  # Stripe's created: an organization's tier reads the oldest first
    as_of: int | None = None
    tie: str | None = None
    object: Literal["subscription"] = "subscription"


@dataclass(frozen=True)
class EntitlementsChange(_Change):
    id: str  # the customer, cus_…: a customer's set of active entitlements is one object
    entitlements: list[dict[str, Any]]  # id, lookup_key, feature
    complete: bool  # False: Stripe said there were more than it sent (has_more), not read yet
    note: str | None = None
    as_of: int | None = None
    tie: str | None = None
    object: Literal["entitlements"] = "entitlements"

    @property
    def customer(self) -> str:
        return self.id


@dataclass(frozen=True)
class PaymentMethodChange(_Change):
    id: str  # pm_… (or a legacy card_…, src_…, ba_…)
    customer: str  # cus_…
    action: Literal["upsert", "delete"] = "upsert"  # delete: detached from its customer
    type: str | None = None
    brand: str | None = None  # cards only, and nothing more of the card than these four
    last4: str | None = None
    exp_month: int | None = None
    exp_year: int | None = None
    as_of: int | None = None
    tie: str | None = None
    object: Literal["payment_method"] = "payment_method"


Change = CustomerChange | SubscriptionChange | EntitlementsChange | PaymentMethodChange


Handler = Callable[[dict[str, Any], Keys], Change | None]
HANDLERS: dict[str, Handler] = {}


def handles(*event_types: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        for event_type in event_types:
            HANDLERS[event_type] = handler
        return handler

    return register


class BadCustomerId(RejectedDelivery):
    """The event's customer is not a cus_… id: bad input, answered 400 like a malformed event."""


def _customer_id(value: Any) -> str:
    # Stripe sends a bare id, or the object when the field was expanded.
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or CUSTOMER_ID.fullmatch(value) is None:
        raise BadCustomerId("the event names no cus_… customer id")
    return value


def _optional_id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def user_link(candidate: Any, source: str) -> tuple[str | None, str | None]:
    """The user id to link, or the note that says why there is none."""
    if candidate is None or candidate == "":
        return None, f"{source} has no user id"
    return _uuid(candidate, source)


def organization_link(metadata: dict[str, Any], key: str) -> tuple[str | None, str | None]:
    """The organization id to link, or the note that says why a named one cannot be; a customer
    need not bill an organization, so none named is no note."""
    candidate = metadata.get(key)
    if candidate is None or candidate == "":
        return None, None
    return _uuid(candidate, f"metadata.{key}")


def _uuid(candidate: Any, source: str) -> tuple[str | None, str | None]:
    try:
        return str(uuid.UUID(str(candidate))), None
    except ValueError:
        return None, f"{source} is not a UUID"


def customer_state(customer: dict[str, Any], keys: Keys) -> CustomerChange:
    """A full Stripe customer object as the upsert it implies (webhooks, backfill, verify --fix)."""
    metadata = customer.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    settings = customer.get("invoice_settings")
    settings = settings if isinstance(settings, dict) else {}
    organization_id, organization_note = organization_link(metadata, keys.organization_id)
    user_id, note = user_link(metadata.get(keys.user_id), f"metadata.{keys.user_id}")
    if organization_id and not metadata.get(keys.user_id):
        note = None  # it bills an organization: naming no user is no fault
    return CustomerChange(
        action="upsert",
        id=_customer_id(customer.get("id")),
        email=_text(customer.get("email")),
        name=_text(customer.get("name")),
        default_payment_method=_optional_id(settings.get("default_payment_method")),
        metadata=metadata,
        user_id=user_id,
        note=note,
        organization_id=organization_id,
        organization_note=organization_note,
    )


def customer_read(found: dict[str, Any], customer_id: str, keys: Keys) -> CustomerChange:
    """What a read of the customer from Stripe asks: a deleted (or unknown) one goes, else its state."""
    if not found or found.get("deleted"):
        return CustomerChange(action="delete", id=customer_id)
    return customer_state(found, keys)


@handles("customer.created", "customer.updated")
def customer_upserted(customer: dict[str, Any], keys: Keys) -> CustomerChange:
    return customer_state(customer, keys)


@handles("customer.deleted")
def customer_deleted(customer: dict[str, Any], keys: Keys) -> CustomerChange:
    return CustomerChange(action="delete", id=_customer_id(customer.get("id")))


@handles("checkout.session.completed")
def checkout_completed(session: dict[str, Any], keys: Keys) -> CustomerChange | None:
    # Sessions in payment mode may have no customer, and a session started with neither the app's
    # user id nor an organization in its metadata has nobody to link: there is nothing to apply.
    metadata = _dict(session.get("metadata"))
    organization_id, organization_note = organization_link(metadata, keys.organization_id)
    named_user = bool(session.get("client_reference_id"))
    if _optional_id(session.get("customer")) is None or not (named_user or organization_id or organization_note):
        return None
    details = _dict(session.get("customer_details"))
    user_id, note = user_link(session.get("client_reference_id"), "client_reference_id") if named_user else (None, None)
    return CustomerChange(
        action="link",
        id=_customer_id(session.get("customer")),
        email=_text(details.get("email")),
        name=_text(details.get("name")),
        metadata={},
        user_id=user_id,
        note=note,
        organization_id=organization_id,
        organization_note=organization_note,
    )


SUBSCRIPTION_ID = re.compile(r"sub_[a-zA-Z0-9]+")
SUBSCRIPTION_STATUSES = {
    "incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused",
}  # fmt: skip


class BadObjectId(RejectedDelivery):
    """A billing event whose object has no well-formed id: bad input, answered 400."""


def _time(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _item(item: dict[str, Any], tier_key: str) -> dict[str, Any]:
    price = _dict(item.get("price")) or _dict(item.get("plan"))
    return {
        "price": _optional_id(price.get("id")),
        "product": _optional_id(price.get("product")),
        "lookup_key": _text(price.get("lookup_key")),
        "quantity": _time(item.get("quantity")),
        "tier": _text(_dict(price.get("metadata")).get(tier_key)),  # the lookup key is the tier's fallback, in SQL
    }


def subscription_state(subscription: dict[str, Any], keys: Keys) -> SubscriptionChange:
    """A full Stripe subscription object as the upsert it implies. Since API version 2025-03-31 the
    period is on the items, not the subscription: the subscription's when present, else the latest
    of its items' (events of both versions arrive during an upgrade)."""
    subscription_id = subscription.get("id")
    if not isinstance(subscription_id, str) or SUBSCRIPTION_ID.fullmatch(subscription_id) is None:
        raise BadObjectId("the event names no sub_… subscription id")
    status = subscription.get("status")
    if status not in SUBSCRIPTION_STATUSES:
        raise BadObjectId("the subscription has no known status")
    items = [item for item in _dict(subscription.get("items")).get("data") or [] if isinstance(item, dict)]
    item_ends = [end for end in (_time(item.get("current_period_end")) for item in items) if end is not None]
    return SubscriptionChange(
        id=subscription_id,
        customer=_customer_id(subscription.get("customer")),
        status=str(status),
        items=[_item(item, keys.tier) for item in items],
        current_period_end=_time(subscription.get("current_period_end")) or (max(item_ends) if item_ends else None),
        cancel_at_period_end=subscription.get("cancel_at_period_end") is True,
        cancel_at=_time(subscription.get("cancel_at")),
        canceled_at=_time(subscription.get("canceled_at")),
        ended_at=_time(subscription.get("ended_at")),
        trial_end=_time(subscription.get("trial_end")),
        metadata=_dict(subscription.get("metadata")),
        created=_time(subscription.get("created")) or _time(subscription.get("start_date")),
    )


@handles(
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.pending_update_applied",
    "customer.subscription.pending_update_expired",
    "customer.subscription.trial_will_end",
)
def subscription_changed(subscription: dict[str, Any], keys: Keys) -> SubscriptionChange:
    return subscription_state(subscription, keys)


def entitlement(active: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": _optional_id(active.get("id")),
        "lookup_key": _text(active.get("lookup_key")),
        "feature": _optional_id(active.get("feature")),
    }


@handles("entitlements.active_entitlement_summary.updated")
def entitlements_changed(summary: dict[str, Any], keys: Keys) -> EntitlementsChange:
    listed = _dict(summary.get("entitlements"))
    active = [entitlement(item) for item in listed.get("data") or [] if isinstance(item, dict)]
    return EntitlementsChange(
        id=_customer_id(summary.get("customer")),
        entitlements=[item for item in active if item["lookup_key"]],
        complete=listed.get("has_more") is not True,
    )


PAYMENT_METHOD_ID = re.compile(r"(pm|card|src|ba)_[a-zA-Z0-9]+")


def payment_method_state(method: dict[str, Any], customer: Any = None) -> PaymentMethodChange:
    """A payment method as the upsert it implies: its type, and for a card the brand, last four
    digits and expiry (never the rest of the card)."""
    method_id = method.get("id")
    if not isinstance(method_id, str) or PAYMENT_METHOD_ID.fullmatch(method_id) is None:
        raise BadObjectId("the event names no pm_… payment method id")
    card = _dict(method.get("card"))
    return PaymentMethodChange(
        id=method_id,
        customer=_customer_id(customer if customer is not None else method.get("customer")),
        type=_text(method.get("type")) or "unknown",
        brand=_text(card.get("brand")),
        last4=_text(card.get("last4")),
        exp_month=_time(card.get("exp_month")),
        exp_year=_time(card.get("exp_year")),
    )


def payment_method_read(found: dict[str, Any], method_id: str) -> PaymentMethodChange:
    """What a read of the payment method from Stripe asks: one attached to no customer (detached,
    or unknown) leaves the table, else its state."""
    if not found or not found.get("customer"):
        return PaymentMethodChange(id=method_id, customer="", action="delete")
    return payment_method_state(found)


@handles("payment_method.attached", "payment_method.updated", "payment_method.automatically_updated")
def payment_method_changed(method: dict[str, Any], keys: Keys) -> PaymentMethodChange:
    return payment_method_state(method)


@handles("payment_method.detached")
def payment_method_detached(method: dict[str, Any], keys: Keys) -> PaymentMethodChange | None:
    # Detached, the object no longer names its customer; the row is found by its own id.
    method_id = method.get("id")
    if not isinstance(method_id, str) or PAYMENT_METHOD_ID.fullmatch(method_id) is None:
        raise BadObjectId("the event names no pm_… payment method id")
    return PaymentMethodChange(id=method_id, customer="", action="delete")
