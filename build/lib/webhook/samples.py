"""Realistic Stripe objects and events, shaped like what Stripe sends (API version 2024-06-20):
used by `send` as a local stand-in for `stripe trigger`, and by the tests."""

from __future__ import annotations

import secrets
import time
from typing import Any

API_VERSION = "2024-06-20"


def stripe_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def customer(
    customer_id: str | None = None,
    *,
    email: str | None = "jenny.rosen@example.com",
    name: str | None = "Jenny Rosen",
    metadata: dict[str, Any] | None = None,
    default_payment_method: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    return {
        "id": customer_id or stripe_id("cus"),
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": created or int(time.time()),
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": email,
        "invoice_prefix": secrets.token_hex(4).upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": default_payment_method,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": metadata or {},
        "name": name,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }


def checkout_session(customer_id: str, user_id: str | None, *, email: str | None, name: str | None) -> dict[str, Any]:
    return {
        "id": stripe_id("cs_test"),
        "object": "checkout.session",
        "amount_subtotal": 2000,
        "amount_total": 2000,
        "client_reference_id": user_id,
        "currency": "usd",
        "customer": customer_id,
        "customer_creation": "always",
        "customer_details": {
            "address": None,
            "email": email,
            "name": name,
            "phone": None,
            "tax_exempt": "none",
        },
        "livemode": False,
        "metadata": {},
        "mode": "subscription",
        "payment_status": "paid",
        "status": "complete",
        "subscription": stripe_id("sub"),
    }


def event(
    event_type: str,
    data_object: dict[str, Any],
    *,
    created: int | None = None,
    livemode: bool = False,
    previous_attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": data_object}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": stripe_id("evt"),
        "object": "event",
        "api_version": API_VERSION,
        "created": created or int(time.time()),
        "data": data,
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": stripe_id("req"), "idempotency_key": secrets.token_hex(16)},
        "type": event_type,
    }


def event_of_type(
    event_type: str,
    *,
    customer_id: str | None = None,
    email: str | None = None,
    name: str | None = None,
    user_id: str | None = None,
    created: int | None = None,
    user_id_key: str = "user_id",
) -> dict[str, Any]:
    """The event `send TYPE` posts: a customer event, a completed checkout, or any other type
    with a small object of its own."""
    customer_id = customer_id or stripe_id("cus")
    metadata = {user_id_key: user_id} if user_id else {}
    if event_type.startswith("customer.") and event_type.count(".") == 1:
        data_object = customer(customer_id, email=email, name=name, metadata=metadata, created=created)
        return event(event_type, data_object, created=created)
    if event_type == "checkout.session.completed":
        return event(event_type, checkout_session(customer_id, user_id, email=email, name=name), created=created)
    noun = event_type.rsplit(".", 1)[0]
    return event(event_type, {"id": stripe_id("obj"), "object": noun, "customer": customer_id}, created=created)
