"""Thin events (event destinations): a signed notification names an object; its current state is
read from Stripe and applied like a Stripe read of a tie, stamped with Stripe's clock, with
sync.source 'thin'. They carry no versioned data, so an API upgrade does not touch them.

Which object a thin type reads is each declared object's `thin` (webhook/objects/): the object the
notification's related_object names, or, for a type that names none, the one the event itself
(GET /v2/core/events/{id}) names. Any other thin type, v2.core.event_destination.ping included, is
logged as ignored.

A delivery only logs and queues the notification (webhook/thin_queue.py); the read happens in the
background. A read ends in one of three ways: the change to apply, `NotYet` (a refusal a retry can
fix: 5xx, 429, a timeout) or `Refused` (one no retry fixes: 404, another 4xx). A 404 is never a
deletion: Stripe answers its own account's key with `"deleted": true` for a deleted object.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import stripe

from webhook import objects, stripe_api
from webhook.budget import Budget, BudgetAdapter, retry_after
from webhook.config import Settings
from webhook.objects import BadObjectId, Change, Reader, StripeObject
from webhook.signature import Event

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


def _declared(event: Event, settings: Settings) -> StripeObject | None:
    if settings.expect_livemode is not None and event.livemode != settings.expect_livemode:
        return None
    return objects.reading_thin(event.type)


def wanted(event: Event, settings: Settings) -> bool:
    """Whether the notification asks for a read: a declared object's type, of the expected
    livemode, naming an object of the v1 API (or one whose event names it)."""
    declared = _declared(event, settings)
    if declared is None:
        return False
    return declared.thin_names is not None or (event.related is not None and event.related.url.startswith("/v1/"))


def object_key(event: Event) -> str:
    """What notifications share one read: the object they name, in their context (one that names
    none is its own)."""
    declared = objects.reading_thin(event.type)
    names_none = event.related is None or (declared is not None and declared.thin_names is not None)
    return f"{event.context or ''}/{event.id if names_none else event.related.id}"  # type: ignore[union-attr]


def _classified(error: stripe.StripeError, what: str) -> Exception:
    """A Stripe error as NotYet or Refused, with a reason safe to store (no key, no customer data)."""
    if isinstance(error, stripe_api.NotAnObject):
        return Refused(f"Stripe's answer for {what} is not an object")
    if isinstance(error, stripe.RateLimitError) or error.http_status == 429:
        return NotYet("Stripe rate limit (HTTP 429)", rate_limited=True, retry_after=retry_after(error.headers))
    if isinstance(error, stripe.APIConnectionError) or (error.http_status or 0) >= 500 or error.http_status is None:
        return NotYet(stripe_api.explain(error))
    if error.http_status == 404:
        return Refused(
            f"Stripe answered 404 for {what}: the API key cannot see it (another account or mode); nothing was changed"
        )
    return Refused(stripe_api.explain(error))


def _reader(client: stripe.StripeClient, event: Event) -> Reader:
    """Reads in the notification's context, Stripe's refusals as NotYet or Refused."""
    get = stripe_api.reader(client, event.context)

    def read(path: str, query: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        try:
            return get(path, query)
        except stripe.StripeError as error:
            raise _classified(error, path.rsplit("/", 1)[-1]) from error

    return read


def read(client: stripe.StripeClient, event: Event, settings: Settings) -> Change:
    """What Stripe says now of the object a wanted thin event names, as the change to apply
    (stamped with Stripe's clock). Raises NotYet or Refused."""
    declared = _declared(event, settings)
    assert declared is not None  # wanted() checked it
    get = _reader(client, event)
    try:
        if declared.thin_names is not None:
            return declared.read(get, declared.thin_names(get, event.id), settings.keys)
        assert event.related is not None  # wanted() checked it
        return declared.read(get, event.related.id, settings.keys)
    except BadObjectId as error:  # Stripe's answer is not an object the consumer can keep
        raise Refused(str(error)) from error


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
