"""Customers: stripe_customers, the link between a Stripe customer and an auth.users row (and,
where the app has them, the organization it bills)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from webhook.config import Keys
from webhook.objects import fields
from webhook.objects.base import CUSTOMER_ID, Change, Reader, StripeObject, listed


@dataclass(frozen=True, kw_only=True)
class CustomerChange(Change):
    object = "customer"
    action: Literal["upsert", "delete", "link"]
    email: str | None = None
    name: str | None = None
    default_payment_method: str | None = None
    metadata: dict[str, Any] | None = None
    user_id: str | None = None  # a well-formed UUID; the database checks it names a free auth.users row
    note: str | None = None  # why no user id could be taken from the event
    organization_id: str | None = None  # the organization it bills: a UUID the database checks likewise
    organization_note: str | None = None  # why the organization id it names cannot be one

    @property
    def deletes(self) -> bool:
        return self.action == "delete"

    @property
    def links_only(self) -> bool:
        return self.action == "link"


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


def state(customer: dict[str, Any], keys: Keys) -> CustomerChange:
    """A full Stripe customer object as the upsert it implies (events, reads, backfill, verify)."""
    metadata = fields.mapping(customer.get("metadata"))
    organization_id, organization_note = organization_link(metadata, keys.organization_id)
    user_id, note = user_link(metadata.get(keys.user_id), f"metadata.{keys.user_id}")
    if organization_id and not metadata.get(keys.user_id):
        note = None  # it bills an organization: naming no user is no fault
    return CustomerChange(
        action="upsert",
        id=fields.customer_id(customer.get("id")),
        email=fields.text(customer.get("email")),
        name=fields.text(customer.get("name")),
        default_payment_method=fields.optional_id(
            fields.mapping(customer.get("invoice_settings")).get("default_payment_method")
        ),
        metadata=metadata,
        user_id=user_id,
        note=note,
        organization_id=organization_id,
        organization_note=organization_note,
    )


def gone(stripe_id: str) -> CustomerChange:
    return CustomerChange(action="delete", id=stripe_id)


def _deleted(customer: dict[str, Any], keys: Keys) -> CustomerChange:
    return gone(fields.customer_id(customer.get("id")))


def _checkout(session: dict[str, Any], keys: Keys) -> CustomerChange | None:
    """A completed checkout links its customer to the user (client_reference_id) and the
    organization (metadata) it names. Sessions in payment mode may have no customer, and one
    started with neither has nobody to link: nothing to apply."""
    metadata = fields.mapping(session.get("metadata"))
    organization_id, organization_note = organization_link(metadata, keys.organization_id)
    named_user = bool(session.get("client_reference_id"))
    if fields.optional_id(session.get("customer")) is None or not (named_user or organization_id or organization_note):
        return None
    details = fields.mapping(session.get("customer_details"))
    user_id, note = user_link(session.get("client_reference_id"), "client_reference_id") if named_user else (None, None)
    return CustomerChange(
        action="link",
        id=fields.customer_id(session.get("customer")),
        email=fields.text(details.get("email")),
        name=fields.text(details.get("name")),
        metadata={},
        user_id=user_id,
        note=note,
        organization_id=organization_id,
        organization_note=organization_note,
    )


def read(reader: Reader, stripe_id: str, keys: Keys) -> CustomerChange:
    """Stripe answers a deleted customer with `"deleted": true`: its deletion."""
    found, clock = reader(f"/v1/customers/{stripe_id}", {})
    return replace(gone(stripe_id) if found.get("deleted") else state(found, keys), as_of=clock)


def list_all(reader: Reader, keys: Keys, after: str | None = None) -> Iterator[CustomerChange]:
    """Every live customer (Stripe's list leaves deleted ones out), newest first."""
    for found in listed(reader, "/v1/customers", {"starting_after": after} if after else {}):
        yield state(found, keys)


CUSTOMER = StripeObject(
    name="customer",
    plural="customers",
    id=CUSTOMER_ID,
    table="stripe_customers",
    column="stripe_customer_id",
    events={
        "customer.created": state,
        "customer.updated": state,
        "customer.deleted": _deleted,
        "checkout.session.completed": _checkout,
    },
    thin=("v1.customer.created", "v1.customer.updated", "v1.customer.deleted"),
    read=read,
    scope="account",
    listing=list_all,
    compared=("email", "name"),
    local_sql="SELECT stripe_customer_id AS id, stripe_customer_id AS customer, customer_email AS email, "
    "customer_name AS name FROM public.stripe_customers",
    dashboard="customers/{id}",
    gone=gone,
    refetch_always=True,
    of_customer=False,
)
