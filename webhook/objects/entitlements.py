"""A customer's active entitlements: one object per customer (its id is the customer's), whose
latest state replaces the whole set in stripe_entitlements, stamped on its stripe_entitlement_sets
row. A summary event lists at most 10; the rest is read from Stripe (webhook/process.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from webhook.config import Keys
from webhook.objects import fields
from webhook.objects.base import CUSTOMER_ID, Change, Reader, StripeObject, listed

LIST = "/v1/entitlements/active_entitlements"


@dataclass(frozen=True, kw_only=True)
class EntitlementsChange(Change):
    object = "entitlements"
    entitlements: list[dict[str, Any]]  # id, lookup_key, feature
    whole: bool  # False: Stripe said there were more than it sent (has_more), not read yet
    note: str | None = None

    @property
    def complete(self) -> bool:
        return self.whole

    def incomplete(self, why: str) -> EntitlementsChange:
        return replace(self, note=f"entitlements not complete: the summary lists 10, and {why}")

    def as_json(self) -> dict[str, Any]:
        return {**super().as_json(), "complete": self.whole}

    def compared_value(self, label: str) -> Any:
        # The set as reconciliation sees it here: its lookup keys, sorted.
        return sorted(item["lookup_key"] for item in self.entitlements) if label == "entitlements" else None


def _entitlement(active: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": fields.optional_id(active.get("id")),
        "lookup_key": fields.text(active.get("lookup_key")),
        "feature": fields.optional_id(active.get("feature")),
    }


def _keyed(active: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stripe's active entitlements as stored: one without a lookup key is nothing access can ask for."""
    return [item for item in map(_entitlement, active) if item["lookup_key"]]


def whole(customer: str, active: list[dict[str, Any]], as_of: int | None = None) -> EntitlementsChange:
    """A customer's whole set, from every page of Stripe's active entitlements."""
    return EntitlementsChange(id=customer, entitlements=_keyed(active), whole=True, as_of=as_of)


def summary(event_object: dict[str, Any], keys: Keys) -> EntitlementsChange:
    listed_here = fields.mapping(event_object.get("entitlements"))
    active = [item for item in listed_here.get("data") or [] if isinstance(item, dict)]
    return EntitlementsChange(
        id=fields.customer_id(event_object.get("customer")),
        entitlements=_keyed(active),
        whole=listed_here.get("has_more") is not True,
    )


def read(reader: Reader, customer: str, keys: Keys) -> EntitlementsChange:
    """Every page of the customer's active entitlements, stamped with the last page's clock."""
    clock: list[int] = []

    def reading(path: str, query: Any) -> tuple[dict[str, Any], int]:
        found = reader(path, query)
        clock.append(found[1])
        return found

    active = list(listed(reading, LIST, {"customer": customer}))
    return whole(customer, active, clock[-1])


def list_of(reader: Reader, customer: str, keys: Keys) -> Iterator[EntitlementsChange]:
    yield read(reader, customer, keys)


def _customer_of_event(reader: Reader, event_id: str) -> str:
    """A thin summary names no object: the event itself (GET /v2/core/events/{id}) names the customer."""
    full, _ = reader(f"/v2/core/events/{event_id}", {})
    data, related = fields.mapping(full.get("data")), fields.mapping(full.get("related_object"))
    return fields.customer_id(data.get("customer") or related.get("id"))


ENTITLEMENTS = StripeObject(
    name="entitlements",
    plural="entitlement sets",
    id=CUSTOMER_ID,
    table="stripe_entitlement_sets",
    column="stripe_customer_id",
    events={"entitlements.active_entitlement_summary.updated": summary},
    thin=("v1.entitlements.active_entitlement_summary.",),
    read=read,
    scope="customer",
    listing=list_of,
    compared=("entitlements",),
    local_sql="SELECT s.stripe_customer_id AS id, s.stripe_customer_id AS customer, coalesce(array_agg(e.lookup_key "
    "ORDER BY e.lookup_key) FILTER (WHERE e.lookup_key IS NOT NULL), '{}') AS entitlements "
    "FROM public.stripe_entitlement_sets s LEFT JOIN public.stripe_entitlements e USING (stripe_customer_id) "
    "GROUP BY 1",
    dashboard="customers/{customer}",
    thin_names=_customer_of_event,
)
