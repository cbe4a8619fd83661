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
from dataclasses import replace
from email.utils import parsedate_to_datetime

import stripe

from webhook import stripe_api
from webhook.config import Settings
from webhook.handlers import CustomerChange, customer_state
from webhook.logs import log

# Whole budget for one read: a 429 or a 5xx is tried again after a short pause within it.
TIMEOUT_SECONDS = 2.0
ATTEMPTS = 3
PAUSE_SECONDS = 0.25


def _stripe_clock(customer: stripe.StripeObject) -> int:
    response = customer.last_response
    date = response.headers.get("Date") if response is not None else None
    try:
        return int(parsedate_to_datetime(date).timestamp()) if date else int(time.time())
    except (TypeError, ValueError):
        return int(time.time())


def customer_now(settings: Settings, customer_id: str) -> CustomerChange | None:
    """The customer as Stripe has it now, as a change stamped with Stripe's clock; None when it
    cannot be read in time (or Stripe has no such customer for this key)."""
    if settings.stripe_api_key is None:
        return None
    client = stripe_api.delivery_client(settings.stripe_api_key, settings.stripe_api_base, TIMEOUT_SECONDS)
    deadline = time.monotonic() + TIMEOUT_SECONDS
    for attempt in range(1, ATTEMPTS + 1):
        try:
            customer = client.v1.customers.retrieve(customer_id)
        except (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError) as error:
            retry = attempt < ATTEMPTS and time.monotonic() + PAUSE_SECONDS < deadline
            log(logging.WARNING, "stripe read failed", stripe_customer_id=customer_id, error=type(error).__name__)
            if not retry:
                return None
            time.sleep(PAUSE_SECONDS * attempt)
            continue
        except stripe.StripeError as error:
            log(logging.WARNING, "stripe read refused", stripe_customer_id=customer_id, error=type(error).__name__)
            return None
        as_of = _stripe_clock(customer)
        state = customer.to_dict()
        if state.get("deleted"):
            return CustomerChange(action="delete", id=customer_id, as_of=as_of)
        return replace(customer_state(state, settings.user_id_metadata_key), as_of=as_of)
    return None
