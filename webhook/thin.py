"""Thin events (event destinations): a signed notification names an object; its current state is
read from Stripe and applied like a Stripe read of a tie, stamped with Stripe's clock, with
sync.source 'thin'. They carry no versioned data, so an API upgrade does not touch them.

Which object a thin type reads: v1.customer.* the customer, every v1.customer.subscription.* the
subscription (Stripe's finer types such as .active or .past_due each just say it changed),
v1.payment_method.* the payment method, and v1.entitlements.active_entitlement_summary.* the
customer's whole set of active entitlements (the notification names no related object: the event
itself, GET /v2/core/events/{id}, names the customer). Any other thin type,
v2.core.event_destination.ping included, is logged as ignored.

A delivery only logs and queues the notification (webhook/thin_queue.py); the read happens in the
background. A read ends in one of three ways: the change to apply, `NotYet` (a refusal a retry can
fix: 5xx, 429, a timeout) or `Refused` (one no retry fixes: 404, another 4xx). A 404 is never a
deletion: Stripe answers its own account's key with `"deleted": true` for a deleted object.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import stripe

from webhook import stripe_api
from webhook.budget import Budget, BudgetAdapter, retry_after
from webhook.config import Settings
from webhook.handlers import (
    Change,
    EntitlementsChange,
    customer_read,
    entitlement,
    payment_method_read,
    subscription_state,
)
from webhook.verify import Event

CUSTOMER_TYPES = ("v1.customer.created", "v1.customer.updated", "v1.customer.deleted")
PAYMENT_METHOD_PREFIX = "v1.payment_method."
SUBSCRIPTION_PREFIX = "v1.customer.subscription."
ENTITLEMENTS_PREFIX = "v1.entitlements.active_entitlement_summary."
# One read waits this long at most: it runs in the background, never while a delivery waits.
READ_TIMEOUT_SECONDS = 10.0


NEEDS_KEY = "thin events need STRIPE_API_KEY to read the object they name; kept as failed, replay it once set"


class ThinNeedsKey(Exception):
    """A thin event cannot be applied without STRIPE_API_KEY: kept as failed, for a replay."""


class NotYet(Exception):
    """Stripe did not answer in a way a retry can fix (down, slow, 5xx, 429): read again later."""

    def __init__(self, reason: str, rate_limited: bool = False, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.rate_limited = rate_limited
        self.retry_after = retry_after


class Refused(Exception):
    """Stripe refused the read in a way no retry fixes (404, another 4xx): the notification fails."""


def handled(event: Event) -> bool:
    return event.type in CUSTOMER_TYPES or event.type.startswith(
        (SUBSCRIPTION_PREFIX, ENTITLEMENTS_PREFIX, PAYMENT_METHOD_PREFIX)
    )


def wanted(event: Event, settings: Settings) -> bool:
    """Whether the notification asks for a read: a handled type of the expected livemode."""
    if settings.expect_livemode is not None and event.livemode != settings.expect_livemode:
        return False
    if event.type.startswith(ENTITLEMENTS_PREFIX):
        return True
    return handled(event) and event.related is not None and event.related.url.startswith("/v1/")


def object_key(event: Event) -> str:
    """What notifications share one read: the object they name, in their context (an entitlement
    summary names none, so each is its own)."""
    named = event.id if event.type.startswith(ENTITLEMENTS_PREFIX) or event.related is None else event.related.id
    return f"{event.context or ''}/{named}"


def _classified(error: stripe.StripeError, what: str) -> Exception:
    """A Stripe error as NotYet or Refused, with a reason safe to store (no key, no customer data)."""
    if isinstance(error, stripe.RateLimitError) or error.http_status == 429:
        return NotYet("Stripe rate limit (HTTP 429)", rate_limited=True, retry_after=retry_after(error.headers))
    if isinstance(error, stripe.APIConnectionError) or (error.http_status or 0) >= 500 or error.http_status is None:
        return NotYet(stripe_api.explain(error))
    if error.http_status == 404:
        return Refused(
            f"Stripe answered 404 for {what}: the API key cannot see it (another account or mode); nothing was changed"
        )
    return Refused(stripe_api.explain(error))


def _get(client: stripe.StripeClient, event: Event, url: str, **query: Any) -> tuple[dict[str, Any], int]:
    """GET a /v1 or /v2 path on the configured Stripe API, with the notification's context: the
    object and Stripe's clock (the answer's Date)."""
    options: dict[str, Any] = {"stripe_context": event.context} if event.context else {}
    try:
        answer = client.raw_request("get", url, **query, **options)
    except stripe.StripeError as error:
        raise _classified(error, url.rsplit("/", 1)[-1]) from error
    found = answer.data
    if not isinstance(found, dict):
        raise Refused(f"Stripe's answer for {url.rsplit('/', 1)[-1]} is not an object")
    return dict(found), stripe_api.stripe_clock(answer.headers.get("Date"))


def _entitlements(client: stripe.StripeClient, event: Event) -> EntitlementsChange:
    full, _ = _get(client, event, f"/v2/core/events/{event.id}")
    data, related = full.get("data"), full.get("related_object")
    customer = (data.get("customer") if isinstance(data, dict) else None) or (
        related.get("id") if isinstance(related, dict) else None
    )
    if not isinstance(customer, str):
        raise Refused("the event Stripe returned names no customer")
    items: list[dict[str, Any]] = []
    after: str | None = None
    as_of = 0
    while True:  # every page: a set that stops at the first would drop features
        query: dict[str, Any] = {"customer": customer, "limit": 100, **({"starting_after": after} if after else {})}
        page, as_of = _get(client, event, "/v1/entitlements/active_entitlements", **query)
        listed = [entitlement(item) for item in page.get("data") or [] if isinstance(item, dict)]
        items += listed
        if not page.get("has_more") or not listed:
            break
        after = str(listed[-1]["id"])
    return EntitlementsChange(
        id=customer, entitlements=[i for i in items if i["lookup_key"]], complete=True, as_of=as_of
    )


def read(client: stripe.StripeClient, event: Event, settings: Settings) -> Change:
    """What Stripe says now of the object a wanted thin event names, as the change to apply
    (stamped with Stripe's clock). Raises NotYet or Refused."""
    if event.type.startswith(ENTITLEMENTS_PREFIX):
        return _entitlements(client, event)
    assert event.related is not None  # wanted() checked it
    found, as_of = _get(client, event, event.related.url)
    if event.type in CUSTOMER_TYPES:
        return replace(customer_read(found, event.related.id, settings.keys), as_of=as_of)
    if event.type.startswith(PAYMENT_METHOD_PREFIX):
        return replace(payment_method_read(found, event.related.id), as_of=as_of)
    return replace(subscription_state(found, settings.keys), as_of=as_of)


def client_for(settings: Settings, budget: Budget) -> stripe.StripeClient:
    """A client whose every request (a list's pages too) takes a token of the deployment's budget
    first, and pauses everyone on a 429; no retries of its own: the queue reads again later."""
    if settings.stripe_api_key is None:
        raise ThinNeedsKey(NEEDS_KEY)
    return _client(settings.stripe_api_key, settings.stripe_api_base, budget)


@functools.cache
def _client(api_key: str, api_base: str, budget: Budget) -> stripe.StripeClient:
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base},
        max_network_retries=0,
        http_client=stripe.RequestsClient(
            timeout=READ_TIMEOUT_SECONDS, session=stripe_api.session(BudgetAdapter(budget))
        ),
    )
