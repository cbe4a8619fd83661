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


NEW_PERIOD_API = "2025-03-31.basil"  # from here on the period is on the items, not the subscription


def price(lookup_key: str = "pro_monthly", *, tier: str | None = "pro", amount: int = 2000) -> dict[str, Any]:
    return {
        "id": stripe_id("price"),
        "object": "price",
        "active": True,
        "currency": "usd",
        "lookup_key": lookup_key,
        "metadata": {"tier": tier} if tier else {},
        "nickname": None,
        "product": stripe_id("prod"),
        "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
        "type": "recurring",
        "unit_amount": amount,
        "unit_amount_decimal": str(amount),
    }


def subscription(
    customer_id: str,
    subscription_id: str | None = None,
    *,
    status: str = "active",
    prices: list[dict[str, Any]] | None = None,
    period_end: int | None = None,
    cancel_at_period_end: bool = False,
    canceled_at: int | None = None,
    new_period_shape: bool = False,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A subscription as Stripe sends it: before API version 2025-03-31 the period is on the
    subscription, from it on (new_period_shape) only on its items."""
    now = int(time.time())
    end = period_end or now + 30 * 86400
    period = {"current_period_start": end - 30 * 86400, "current_period_end": end}
    items = [
        {
            "id": stripe_id("si"),
            "object": "subscription_item",
            "price": item_price,
            "quantity": 1,
            **(period if new_period_shape else {}),
        }
        for item_price in (prices or [price()])
    ]
    return {
        "id": subscription_id or stripe_id("sub"),
        "object": "subscription",
        "cancel_at": None,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": canceled_at,
        "created": now - 86400,
        "currency": "usd",
        **({} if new_period_shape else period),
        "customer": customer_id,
        "ended_at": canceled_at if status == "canceled" else None,
        "items": {"object": "list", "data": items, "has_more": False, "url": "/v1/subscription_items"},
        "livemode": False,
        "metadata": metadata or {},
        "status": status,
        "trial_end": None,
    }


def payment_method(customer_id: str | None, *, last4: str = "4242", exp_year: int = 2030) -> dict[str, Any]:
    """A card payment method as Stripe sends it (its customer is null once detached)."""
    return {
        "id": stripe_id("pm"),
        "object": "payment_method",
        "billing_details": {"address": None, "email": None, "name": None, "phone": None},
        "card": {
            "brand": "visa",
            "checks": {"cvc_check": "pass"},
            "country": "US",
            "exp_month": 12,
            "exp_year": exp_year,
            "fingerprint": secrets.token_hex(8),
            "funding": "credit",
            "last4": last4,
        },
        "created": int(time.time()),
        "customer": customer_id,
        "livemode": False,
        "metadata": {},
        "type": "card",
    }


def entitlement_summary(customer_id: str, lookup_keys: list[str], *, has_more: bool = False) -> dict[str, Any]:
    """An entitlements.active_entitlement_summary as Stripe sends it (at most 10 listed)."""
    data = [
        {
            "id": stripe_id("ent"),
            "object": "entitlements.active_entitlement",
            "feature": stripe_id("feat"),
            "livemode": False,
            "lookup_key": key,
        }
        for key in lookup_keys[:10]
    ]
    return {
        "object": "entitlements.active_entitlement_summary",
        "customer": customer_id,
        "entitlements": {
            "object": "list",
            "data": data,
            "has_more": has_more or len(lookup_keys) > 10,
            "url": f"/v1/customer/{customer_id}/entitlements",
        },
        "livemode": False,
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


def invoice(
    customer_id: str,
    invoice_id: str | None = None,
    *,
    subscription_id: str | None = None,
    status: str = "open",
    amount: int = 2000,
    attempt_count: int = 0,
    lines: int = 1,
    page: int = 10,
    new_shape: bool = True,
) -> dict[str, Any]:
    """An invoice as Stripe sends it, of the API shape since 2025-03-31 (new_shape: its
    subscription under parent, a line's price under pricing) or before; `lines` lines, of which
    the payload holds the first `page` (has_more beyond)."""
    now = int(time.time())
    invoice_id = invoice_id or stripe_id("in")
    made = []
    for n in range(lines):
        price_id = f"price_line{n}"
        line: dict[str, Any] = {
            "id": f"il_{invoice_id[3:]}{n}",
            "object": "line_item",
            "amount": amount // max(lines, 1),
            "currency": "usd",
            "quantity": 1,
            "period": {"start": now - 30 * 86400, "end": now},
        }
        if new_shape:
            line["pricing"] = {"type": "price_details", "price_details": {"price": price_id, "product": "prod_plan"}}
        else:
            line["price"] = {"id": price_id, "object": "price", "product": "prod_plan"}
        made.append(line)
    paid = status == "paid"
    found: dict[str, Any] = {
        "id": invoice_id,
        "object": "invoice",
        "customer": customer_id,
        "status": status,
        "amount_due": amount,
        "amount_paid": amount if paid else 0,
        "amount_remaining": 0 if paid else amount,
        "currency": "usd",
        "attempt_count": attempt_count,
        "next_payment_attempt": now + 3 * 86400 if status == "open" and attempt_count else None,
        "due_date": None,
        "billing_reason": "subscription_cycle" if subscription_id else "manual",
        "hosted_invoice_url": f"https://invoice.stripe.com/i/acct_test/{invoice_id}",
        "status_transitions": {"paid_at": now if paid else None, "finalized_at": now - 60},
        "created": now - 3600,
        "livemode": False,
        "metadata": {},
        "lines": {
            "object": "list",
            "data": made[:page],
            "has_more": lines > page,
            "url": f"/v1/invoices/{invoice_id}/lines",
        },
    }
    if new_shape:
        found["parent"] = {"type": "subscription_details", "subscription_details": {"subscription": subscription_id}}
    else:
        found["subscription"] = subscription_id
    return found


def thin_event(
    event_type: str, related_id: str | None, *, created: float | None = None, context: str | None = None
) -> dict[str, Any]:
    """An event destination's thin notification (object v2.core.event): it names the object, and
    the consumer reads its current state from Stripe."""
    moment = created if created is not None else time.time()
    kind = "customer"
    if event_type.startswith("v1.customer.subscription."):
        kind = "subscription"
    elif event_type.startswith("v1.payment_method."):
        kind = "payment_method"
    elif event_type.startswith("v1.invoice."):
        kind = "invoice"
    path = {
        "customer": "customers",
        "subscription": "subscriptions",
        "payment_method": "payment_methods",
        "invoice": "invoices",
    }[kind]
    notification: dict[str, Any] = {
        "id": stripe_id("evt_test"),
        "object": "v2.core.event",
        "type": event_type,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment * 1000) % 1000:03d}Z",
        "livemode": False,
        "context": context,
        "reason": None,
    }
    if event_type == "v2.core.event_destination.ping":
        destination = stripe_id("ed_test")
        url = f"/v2/core/event_destinations/{destination}"
        notification["related_object"] = {"id": destination, "type": "v2.core.event_destination", "url": url}
    elif related_id is not None:
        notification["related_object"] = {"id": related_id, "type": kind, "url": f"/v1/{path}/{related_id}"}
    return notification


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
    if event_type.startswith("customer.subscription."):
        status = "canceled" if event_type.endswith(".deleted") else "active"
        made = event(event_type, subscription(customer_id, status=status, new_period_shape=True), created=created)
        return {**made, "api_version": NEW_PERIOD_API}
    if event_type == "entitlements.active_entitlement_summary.updated":
        return event(event_type, entitlement_summary(customer_id, ["pro"]), created=created)
    if event_type.startswith("invoice.") and event_type != "invoice.upcoming":
        status = {"invoice.paid": "paid", "invoice.voided": "void", "invoice.created": "draft"}.get(event_type, "open")
        failed = 1 if event_type == "invoice.payment_failed" else 0
        return event(event_type, invoice(customer_id, status=status, attempt_count=failed), created=created)
    noun = event_type.rsplit(".", 1)[0]
    return event(event_type, {"id": stripe_id("obj"), "object": noun, "customer": customer_id}, created=created)
