"""Thin events (event destinations): a signed notification names an object; its current state is
read from Stripe and applied like a Stripe read of a tie, stamped with Stripe's clock, with
sync.source 'thin'. They carry no versioned data, so an API upgrade does not touch them.

Which object a thin type reads: v1.customer.* the customer, every v1.customer.subscription.* the
subscription (Stripe's finer types such as .active or .past_due each just say it changed), and
v1.entitlements.active_entitlement_summary.* the customer's whole set of active entitlements (the
notification names no related object: the event itself, GET /v2/core/events/{id}, names the
customer). Any other thin type, v2.core.event_destination.ping included, is logged as ignored.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import stripe

from webhook import refetch, stripe_api
from webhook.config import Settings
from webhook.handlers import Change, customer_read, payment_method_read, subscription_state
from webhook.verify import Event

CUSTOMER_TYPES = ("v1.customer.created", "v1.customer.updated", "v1.customer.deleted")
PAYMENT_METHOD_PREFIX = "v1.payment_method."
SUBSCRIPTION_PREFIX = "v1.customer.subscription."
ENTITLEMENTS_PREFIX = "v1.entitlements.active_entitlement_summary."


class ThinNeedsKey(Exception):
    """A thin event cannot be applied without STRIPE_API_KEY: kept as failed, for a replay."""


class StripeNotAnswering(Exception):
    """Stripe could not be read in time (down, slow, 5xx, 429): the delivery is answered 503 and the
    event kept for Stripe's retry, replay and heal."""


def handled(event: Event) -> bool:
    return event.type in CUSTOMER_TYPES or event.type.startswith(
        (SUBSCRIPTION_PREFIX, ENTITLEMENTS_PREFIX, PAYMENT_METHOD_PREFIX)
    )


def _read(settings: Settings, event: Event, url: str) -> tuple[dict[str, Any], int]:
    """GET a /v1 or /v2 path on the configured Stripe API, with the notification's context: the
    object and Stripe's clock (the answer's Date)."""
    if settings.stripe_api_key is None:
        raise ThinNeedsKey("thin events need STRIPE_API_KEY to read the object they name; replay it once set")
    client = stripe_api.delivery_client(settings.stripe_api_key, settings.stripe_api_base, refetch.TIMEOUT_SECONDS)
    options: dict[str, Any] = {"stripe_context": event.context} if event.context else {}
    try:
        answer = client.raw_request("get", url, **options)
    except stripe.InvalidRequestError as error:
        if error.http_status == 404:
            return {}, stripe_api.stripe_clock(None)
        raise StripeNotAnswering(stripe_api.explain(error)) from error
    except stripe.StripeError as error:
        raise StripeNotAnswering(stripe_api.explain(error)) from error
    return dict(answer.data), stripe_api.stripe_clock(answer.headers.get("Date"))


def change_for(event: Event, settings: Settings) -> Change | None:
    """What Stripe says now of the object a thin event names, as the change to apply (stamped with
    Stripe's clock); None for a type the consumer does not handle, or the other livemode."""
    if settings.expect_livemode is not None and event.livemode != settings.expect_livemode:
        return None
    if not handled(event):
        return None
    if event.type.startswith(ENTITLEMENTS_PREFIX):
        full, _ = _read(settings, event, f"/v2/core/events/{event.id}")
        data = full.get("data")
        related = full.get("related_object")
        customer = (data.get("customer") if isinstance(data, dict) else None) or (
            related.get("id") if isinstance(related, dict) else None
        )
        if not isinstance(customer, str):
            raise StripeNotAnswering("the event names no customer")
        whole = refetch.entitlements_now(settings, customer)
        if whole is None:
            raise StripeNotAnswering("Stripe could not list the customer's entitlements")
        return whole
    if event.related is None or not event.related.url.startswith("/v1/"):
        return None
    found, as_of = _read(settings, event, event.related.url)
    if event.type in CUSTOMER_TYPES:
        return replace(customer_read(found, event.related.id, settings.keys), as_of=as_of)
    if event.type.startswith(PAYMENT_METHOD_PREFIX):
        return replace(payment_method_read(found, event.related.id), as_of=as_of)
    if not found:
        raise StripeNotAnswering("Stripe does not know the subscription")
    return replace(subscription_state(found, settings.keys), as_of=as_of)
