"""Subscriptions: stripe_subscriptions. Stripe keeps canceled ones, and so do we: a subscription
is never deleted here, and one Stripe no longer lists is reported, not removed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from webhook.config import Keys
from webhook.objects import fields
from webhook.objects.base import BadObjectId, OwnedChange, Reader, StripeObject, listed

STATUSES = {
    "incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled", "unpaid", "paused",
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SubscriptionChange(OwnedChange):
    object = "subscription"
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


def _item(item: dict[str, Any], tier_key: str) -> dict[str, Any]:
    price = fields.mapping(item.get("price")) or fields.mapping(item.get("plan"))
    return {
        "price": fields.optional_id(price.get("id")),
        "product": fields.optional_id(price.get("product")),
        "lookup_key": fields.text(price.get("lookup_key")),
        "quantity": fields.integer(item.get("quantity")),
        "tier": fields.text(
            fields.mapping(price.get("metadata")).get(tier_key)
        ),  # the lookup key is the tier's fallback, in SQL
    }


def state(subscription: dict[str, Any], keys: Keys) -> SubscriptionChange:
    """A full Stripe subscription object as the upsert it implies. Since API version 2025-03-31 the
    period is on the items, not the subscription: the subscription's when present, else the latest
    of its items' (events of both versions arrive during an upgrade)."""
    status = subscription.get("status")
    if status not in STATUSES:
        raise BadObjectId("the subscription has no known status")
    items = [item for item in fields.mapping(subscription.get("items")).get("data") or [] if isinstance(item, dict)]
    item_ends = [end for end in (fields.integer(item.get("current_period_end")) for item in items) if end is not None]
    return SubscriptionChange(
        id=fields.object_id(subscription.get("id"), SUBSCRIPTION.id, "sub_… subscription"),
        customer_id=fields.customer_id(subscription.get("customer")),
        status=str(status),
        items=[_item(item, keys.tier) for item in items],
        current_period_end=fields.integer(subscription.get("current_period_end"))
        or (max(item_ends) if item_ends else None),
        cancel_at_period_end=subscription.get("cancel_at_period_end") is True,
        cancel_at=fields.integer(subscription.get("cancel_at")),
        canceled_at=fields.integer(subscription.get("canceled_at")),
        ended_at=fields.integer(subscription.get("ended_at")),
        trial_end=fields.integer(subscription.get("trial_end")),
        metadata=fields.mapping(subscription.get("metadata")),
        created=fields.integer(subscription.get("created")) or fields.integer(subscription.get("start_date")),
    )


def read(reader: Reader, stripe_id: str, keys: Keys) -> SubscriptionChange:
    found, clock = reader(f"/v1/subscriptions/{stripe_id}", {})
    return replace(state(found, keys), as_of=clock)


def list_all(reader: Reader, keys: Keys, after: str | None = None) -> Iterator[SubscriptionChange]:
    """Every subscription of the account, canceled ones too (status=all), newest first."""
    query = {"status": "all", **({"starting_after": after} if after else {})}
    for found in listed(reader, "/v1/subscriptions", query):
        yield state(found, keys)


SUBSCRIPTION = StripeObject(
    name="subscription",
    plural="subscriptions",
    id=re.compile(r"sub_[a-zA-Z0-9]+"),
    table="stripe_subscriptions",
    column="stripe_subscription_id",
    events=dict.fromkeys(
        (
            "customer.subscription.created",
            "customer.subscription.updated",
            "customer.subscription.deleted",
            "customer.subscription.paused",
            "customer.subscription.resumed",
            "customer.subscription.pending_update_applied",
            "customer.subscription.pending_update_expired",
            "customer.subscription.trial_will_end",
        ),
        state,
    ),
    # Stripe's thin catalogue has finer types (.active, .past_due): each just says it changed.
    thin=("v1.customer.subscription.",),
    read=read,
    scope="account",
    listing=list_all,
    compared=("status", "current_period_end", "items"),
    local_sql="SELECT stripe_subscription_id AS id, stripe_customer_id AS customer, status, "
    "extract(epoch FROM current_period_end)::bigint AS current_period_end, items FROM public.stripe_subscriptions",
    dashboard="subscriptions/{id}",
)
