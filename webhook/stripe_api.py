"""Stripe API out, through the official client: its pagination, retries and idempotency keys."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import requests
import stripe
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from webhook.budget import Budget, BudgetAdapter
from webhook.config import ConfigError, Settings
from webhook.objects.base import Reader

# Retries on connection errors, 409, 5xx and when Stripe says so (Stripe-Should-Retry), with the
# library's own backoff; an idempotency key makes a retried create safe. Each try waits at most
# TIMEOUT_SECONDS, so a Stripe that never answers costs a command about half a minute.
NETWORK_RETRIES = 2
TIMEOUT_SECONDS = 10
PAGE = 100  # the most Stripe's list endpoints give at once
EVENTS_KEPT_SECONDS = 30 * 86400  # Stripe's Events API keeps 30 days
# The library does not retry 429, which Stripe answers when the account's request rate is exceeded
# and asks clients to back off and try again; a request refused with 429 did nothing, so repeating
# it (a POST too) is safe. urllib3 waits 0, 1, 2, 4, 8 s between tries (or as Retry-After says).
RATE_LIMITED = Retry(
    total=None,
    connect=0,
    read=0,
    other=0,
    redirect=0,
    status=5,
    status_forcelist=[429],
    allowed_methods=None,
    backoff_factor=0.5,
    backoff_max=8,
    respect_retry_after_header=True,
    raise_on_status=False,
)


class NotAnObject(stripe.StripeError):
    """Stripe answered a read with something that is not a JSON object."""


class StripeUnavailable(Exception):
    """A Stripe API call failed for good; the message is safe to print (no key, no customer data)."""


def make_client(settings: Settings, budget: Budget | None = None) -> stripe.StripeClient:
    """A client for the commands; with the deployment's `budget` (heal, backfill, verify) it keeps
    under STRIPE_API_RATE requests a second with every other process: Stripe's limit is for the
    whole account, and checkout shares it."""
    if not settings.stripe_api_key:
        raise ConfigError("STRIPE_API_KEY is required for this command")
    adapter = HTTPAdapter(max_retries=RATE_LIMITED) if budget is None else BudgetAdapter(budget, RATE_LIMITED)
    return stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses={"api": settings.stripe_api_base},
        max_network_retries=NETWORK_RETRIES,
        http_client=stripe.RequestsClient(timeout=TIMEOUT_SECONDS, session=session(adapter)),
    )


@functools.cache
def delivery_client(api_key: str, api_base: str, timeout: float) -> stripe.StripeClient:
    """A client for reads made while a delivery waits (a tie's third rule, STRIPE_REFETCH=always):
    no retries of its own, since the library's would wait longer than a delivery may; the caller
    retries within its budget. One per process, its connections kept alive."""
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base},
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=timeout),
    )


def session(adapter: HTTPAdapter) -> requests.Session:
    """A requests session that sends everything through `adapter` (its retries, its budget)."""
    http = requests.Session()
    for scheme in ("https://", "http://"):
        http.mount(scheme, adapter)
    return http


def explain(error: stripe.StripeError) -> str:
    status = f" (HTTP {error.http_status})" if error.http_status else ""
    reason = {
        stripe.AuthenticationError: "Stripe rejected the API key",
        stripe.PermissionError: "the API key may not do this",
        stripe.RateLimitError: "Stripe rate limit, still limited after 5 retries over 15 s",
        stripe.APIConnectionError: "could not reach the Stripe API",
        stripe.IdempotencyError: "Stripe refused a reused idempotency key",
    }.get(type(error), "Stripe API error")
    code = f" [{error.code}]" if error.code else ""
    return f"{reason}{status}{code}"


def stripe_clock(date: str | None) -> int:
    """Stripe's clock from an answer's Date header (unix seconds); ours when it has none."""
    try:
        return int(parsedate_to_datetime(date).timestamp()) if date else int(time.time())
    except (TypeError, ValueError):
        return int(time.time())


def plain(stripe_object: Any) -> dict[str, Any]:
    """A Stripe object as the JSON Stripe sent: to_dict() turns decimal strings (a price's
    unit_amount_decimal) into Decimal, which json.dumps refuses; str gives back Stripe's text."""
    return dict(json.loads(json.dumps(stripe_object.to_dict(), default=str)))


def reader(client: stripe.StripeClient, context: str | None = None) -> Reader:
    """GET a /v1 or /v2 path with the client (its retries, its budget) and, for a thin
    notification, its context (Stripe-Context): the object and Stripe's clock (the answer's Date)."""
    options: dict[str, Any] = {"stripe_context": context} if context else {}

    def read(path: str, query: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        answer = client.raw_request("get", path, **query, **options)
        if not isinstance(answer.data, dict):
            raise NotAnObject("not an object")
        return dict(answer.data), stripe_clock(answer.headers.get("Date"))

    return read


def list_events(client: stripe.StripeClient, since: int, types: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Every event of the given types created since `since` (Stripe keeps 30 days), newest first."""
    page = client.v1.events.list(params={"created": {"gte": since}, "types": list(types), "limit": PAGE})
    for event in page.auto_paging_iter():
        yield plain(event)


def create_customer(
    client: stripe.StripeClient, *, email: str | None, metadata: dict[str, str], idempotency_key: str
) -> dict[str, Any]:
    params: dict[str, Any] = {"metadata": metadata}
    if email:
        params["email"] = email
    customer = client.v1.customers.create(params=params, options={"idempotency_key": idempotency_key})  # type: ignore[arg-type]
    return plain(customer)


def update_customer(client: stripe.StripeClient, customer_id: str, changes: dict[str, str]) -> dict[str, Any]:
    return plain(client.v1.customers.update(customer_id, params=changes))  # type: ignore[arg-type]
