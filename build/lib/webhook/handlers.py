"""What each handled Stripe event type means for stripe_customers, as one registry.

A handler reads the event's data.object and returns the CustomerChange to apply, or None when the
event asks for nothing; types with no handler are logged as ignored. Handlers only read: every
write happens in store.py.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from webhook.verify import RejectedDelivery

Action = Literal["upsert", "delete", "link"]
CUSTOMER_ID = re.compile(r"cus_[a-zA-Z0-9]+")  # stripe_customers' valid_stripe_id CHECK


@dataclass(frozen=True)
class CustomerChange:
    action: Action
    id: str  # the Stripe customer id, cus_…
    email: str | None = None
    name: str | None = None
    default_payment_method: str | None = None
    metadata: dict[str, Any] | None = None
    user_id: str | None = None  # a well-formed UUID; the database checks it names a free auth.users row
    note: str | None = None  # why no user id could be taken from the event
    as_of: int | None = None  # unix time of the Stripe read this state comes from (not an event's)
    tie: str | None = None  # "unsettled": apply over a same-second tie nothing could order

    def as_json(self) -> dict[str, Any]:
        # A shallow copy: asdict() deep-copies the metadata, on every event, for json.dumps to read.
        return dict(vars(self))


Handler = Callable[[dict[str, Any], str], CustomerChange | None]
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
    try:
        return str(uuid.UUID(str(candidate))), None
    except ValueError:
        return None, f"{source} is not a UUID"


def customer_state(customer: dict[str, Any], user_id_key: str) -> CustomerChange:
    """A full Stripe customer object as the upsert it implies (webhooks, backfill, verify --fix)."""
    metadata = customer.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    settings = customer.get("invoice_settings")
    settings = settings if isinstance(settings, dict) else {}
    user_id, note = user_link(metadata.get(user_id_key), f"metadata.{user_id_key}")
    return CustomerChange(
        action="upsert",
        id=_customer_id(customer.get("id")),
        email=_text(customer.get("email")),
        name=_text(customer.get("name")),
        default_payment_method=_optional_id(settings.get("default_payment_method")),
        metadata=metadata,
        user_id=user_id,
        note=note,
    )


@handles("customer.created", "customer.updated")
def customer_upserted(customer: dict[str, Any], user_id_key: str) -> CustomerChange:
    return customer_state(customer, user_id_key)


@handles("customer.deleted")
def customer_deleted(customer: dict[str, Any], user_id_key: str) -> CustomerChange:
    return CustomerChange(action="delete", id=_customer_id(customer.get("id")))


@handles("checkout.session.completed")
def checkout_completed(session: dict[str, Any], user_id_key: str) -> CustomerChange | None:
    # Sessions in payment mode may have no customer, and a session started without the app's
    # user id has nobody to link: there is nothing to apply.
    if _optional_id(session.get("customer")) is None or not session.get("client_reference_id"):
        return None
    details = session.get("customer_details")
    details = details if isinstance(details, dict) else {}
    user_id, note = user_link(session.get("client_reference_id"), "client_reference_id")
    return CustomerChange(
        action="link",
        id=_customer_id(session.get("customer")),
        email=_text(details.get("email")),
        name=_text(details.get("name")),
        metadata={},
        user_id=user_id,
        note=note,
    )
