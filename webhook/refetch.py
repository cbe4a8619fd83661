"""A customer's state read from Stripe while an event is delivered: the third rule of a same-second
tie, and every customer event under STRIPE_REFETCH=always (README, "Ties").

Stripe's `created` has one-second resolution, so an event cannot say which of two in one second came
last; a retrieve can, stamped with Stripe's own clock (the response's Date header) so that events
older than the read are stale afterwards. The delivery waits for it, so it is bounded to a few
seconds: when Stripe is slow or failing the caller falls back, and the event is never lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import stripe

from webhook import stripe_api
from webhook.budget import Budget
from webhook.config import Settings
from webhook.handlers import (
    Change,
    CustomerChange,
    EntitlementsChange,
    PaymentMethodChange,
    SubscriptionChange,
    customer_read,
    entitlement,
    payment_method_read,
    subscription_state,
)
from webhook.logs import log

# Whole budget for one read: a 429 or a 5xx is tried again after a short pause within it.
TIMEOUT_SECONDS = 2.0
ATTEMPTS = 3
PAUSE_SECONDS = 0.25

C = TypeVar("C", CustomerChange, SubscriptionChange, PaymentMethodChange)


def _stripe_clock(answer: Any) -> int:
    response = answer.last_response
    return stripe_api.stripe_clock(response.headers.get("Date") if response is not None else None)


def _read(settings: Settings, budget: Budget, what: str, read: Callable[[stripe.StripeClient], Any]) -> Any | None:
    """read(client) within the time budget, each try spending a token of the deployment's read
    budget: a 429 or a 5xx tried again after a short pause; None when Stripe cannot answer in time
    (or refuses: no such object for this key)."""
    assert settings.stripe_api_key is not None
    client = stripe_api.delivery_client(settings.stripe_api_key, settings.stripe_api_base, TIMEOUT_SECONDS)
    deadline = time.monotonic() + TIMEOUT_SECONDS
    for attempt in range(1, ATTEMPTS + 1):
        budget.spend()
        try:
            return read(client)
        except (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError) as error:
            if isinstance(error, stripe.RateLimitError):
                budget.pause(None)
            retry = attempt < ATTEMPTS and time.monotonic() + PAUSE_SECONDS < deadline
            log(logging.WARNING, "stripe read failed", stripe_id=what, error=type(error).__name__)
            if not retry:
                return None
            time.sleep(PAUSE_SECONDS * attempt)
        except stripe.StripeError as error:
            log(logging.WARNING, "stripe read refused", stripe_id=what, error=type(error).__name__)
            return None
    return None


def _retrieved(
    settings: Settings,
    budget: Budget,
    stripe_id: str,
    retrieve: Callable[[stripe.StripeClient], Any],
    as_change: Callable[[Any], C],
) -> C | None:
    """One object as Stripe has it now, as the change it implies stamped with Stripe's clock; None
    without an API key, or when it cannot be read in time."""
    if settings.stripe_api_key is None:
        return None
    found = _read(settings, budget, stripe_id, retrieve)
    if found is None:
        return None
    return replace(as_change(stripe_api.plain(found)), as_of=_stripe_clock(found))


def customer_now(settings: Settings, budget: Budget, customer_id: str) -> CustomerChange | None:
    """The customer as Stripe has it now (None too when Stripe has no such customer for this key)."""
    return _retrieved(
        settings,
        budget,
        customer_id,
        lambda client: client.v1.customers.retrieve(customer_id),
        lambda found: customer_read(found, customer_id, settings.keys),
    )


def subscription_now(settings: Settings, budget: Budget, subscription_id: str) -> SubscriptionChange | None:
    """The subscription as Stripe has it now (Stripe keeps canceled ones)."""
    return _retrieved(
        settings,
        budget,
        subscription_id,
        lambda client: client.v1.subscriptions.retrieve(subscription_id),
        lambda found: subscription_state(found, settings.keys),
    )


def entitlements_now(settings: Settings, budget: Budget, customer_id: str) -> EntitlementsChange | None:
    """The customer's whole set of active entitlements as Stripe lists it now (every page)."""
    if settings.stripe_api_key is None:
        return None

    def listed(client: stripe.StripeClient) -> tuple[list[dict[str, Any]], int]:
        page = client.v1.entitlements.active_entitlements.list(params={"customer": customer_id, "limit": 100})
        items = [entitlement(stripe_api.plain(item)) for item in page.auto_paging_iter()]
        return items, _stripe_clock(page)

    found = _read(settings, budget, customer_id, listed)
    if found is None:
        return None
    items, as_of = found
    return EntitlementsChange(
        id=customer_id, entitlements=[i for i in items if i["lookup_key"]], complete=True, as_of=as_of
    )


def payment_method_now(settings: Settings, budget: Budget, method_id: str) -> PaymentMethodChange | None:
    """The payment method as Stripe has it now; one attached to no customer leaves the table."""
    return _retrieved(
        settings,
        budget,
        method_id,
        lambda client: client.v1.payment_methods.retrieve(method_id),
        lambda found: payment_method_read(found, method_id),
    )


def state_now(settings: Settings, budget: Budget, change: Change) -> Change | None:
    """What Stripe says now of the object a change is about (the third rule of a same-second tie)."""
    if isinstance(change, PaymentMethodChange):
        return payment_method_now(settings, budget, change.id)
    if isinstance(change, SubscriptionChange):
        return subscription_now(settings, budget, change.id)
    if isinstance(change, EntitlementsChange):
        return entitlements_now(settings, budget, change.id)
    return customer_now(settings, budget, change.id)
