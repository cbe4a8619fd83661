"""Payment methods: stripe_payment_methods, a customer's cards and other methods (of a card only
its brand, last four digits and expiry). A detached one leaves the table, with a tombstone."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from webhook.config import Keys
from webhook.objects import fields
from webhook.objects.base import Reader, RemovableChange, StripeObject, listed

ID = re.compile(r"(pm|card|src|ba)_[a-zA-Z0-9]+")


@dataclass(frozen=True, kw_only=True)
class PaymentMethodChange(RemovableChange):
    object = "payment_method"
    type: str | None = None
    brand: str | None = None
    last4: str | None = None
    exp_month: int | None = None
    exp_year: int | None = None

    def compared_value(self, label: str) -> Any:
        # The card's summary, as one value: what a drift line calls "card".
        return [self.brand, self.last4, self.exp_month, self.exp_year] if label == "card" else None


def state(method: dict[str, Any], customer: Any = None) -> PaymentMethodChange:
    card = fields.mapping(method.get("card"))
    return PaymentMethodChange(
        id=fields.object_id(method.get("id"), ID, "pm_… payment method"),
        customer_id=fields.customer_id(customer if customer is not None else method.get("customer")),
        type=fields.text(method.get("type")) or "unknown",
        brand=fields.text(card.get("brand")),
        last4=fields.text(card.get("last4")),
        exp_month=fields.integer(card.get("exp_month")),
        exp_year=fields.integer(card.get("exp_year")),
    )


def gone(stripe_id: str) -> PaymentMethodChange:
    return PaymentMethodChange(id=stripe_id, customer_id="", action="delete")


def _changed(method: dict[str, Any], keys: Keys) -> PaymentMethodChange:
    return state(method)


def _detached(method: dict[str, Any], keys: Keys) -> PaymentMethodChange:
    # Detached, the object no longer names its customer; the row is found by its own id.
    return gone(fields.object_id(method.get("id"), ID, "pm_… payment method"))


def read(reader: Reader, stripe_id: str, keys: Keys) -> PaymentMethodChange:
    """One attached to no customer (detached) leaves the table."""
    found, clock = reader(f"/v1/payment_methods/{stripe_id}", {})
    return replace(state(found) if found.get("customer") else gone(stripe_id), as_of=clock)


def list_of(reader: Reader, customer: str, keys: Keys) -> Iterator[PaymentMethodChange]:
    for found in listed(reader, "/v1/payment_methods", {"customer": customer}):
        yield state(found, customer)


PAYMENT_METHOD = StripeObject(
    name="payment_method",
    plural="payment methods",
    id=ID,
    table="stripe_payment_methods",
    column="stripe_payment_method_id",
    events={
        "payment_method.attached": _changed,
        "payment_method.updated": _changed,
        "payment_method.automatically_updated": _changed,
        "payment_method.detached": _detached,
    },
    thin=("v1.payment_method.",),
    read=read,
    scope="customer",
    listing=list_of,
    compared=("card",),
    local_sql="SELECT stripe_payment_method_id AS id, stripe_customer_id AS customer, "
    "jsonb_build_array(brand, last4, exp_month, exp_year) AS card FROM public.stripe_payment_methods",
    dashboard="customers/{customer}",
    gone=gone,
)
