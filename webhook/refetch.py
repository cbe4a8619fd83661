"""An object's state read from Stripe while a delivery waits: the third rule of a same-second tie,
a summary that lists only part of a set, and every customer event under STRIPE_REFETCH=always
(docs/reference.md, "Ties").

Stripe's `created` has one-second resolution, so an event cannot say which of two in one second came
last; a read can, stamped with Stripe's own clock (the response's Date header) so that events
older than the read are stale afterwards. The delivery waits for it, so it is bounded to a few
seconds: when Stripe is slow or failing the caller falls back, and the event is never lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import stripe

from webhook import objects, stripe_api
from webhook.budget import Budget
from webhook.config import Refetch, Settings
from webhook.logs import log
from webhook.objects import BadObjectId, Change
from webhook.results import Applied, EventFailed, SettledBy, Source, Status

# Whole budget for one read: a 429 or a 5xx is tried again after a short pause within it.
TIMEOUT_SECONDS = 2.0
ATTEMPTS = 3
PAUSE_SECONDS = 0.25


def state_now(settings: Settings, budget: Budget, change: Change) -> Change | None:
    """What Stripe says now of the object a change is about, as the change it implies stamped with
    Stripe's clock, each try spending a token of the deployment's read budget: a 429 or a 5xx tried
    again after a short pause. None without an API key, when Stripe cannot answer in time, or
    when it refuses (no such object for this key)."""
    if settings.stripe_api_key is None:
        return None
    declared = objects.of(change)
    client = stripe_api.delivery_client(settings.stripe_api_key, settings.stripe_api_base, TIMEOUT_SECONDS)
    reader = stripe_api.reader(client)
    deadline = time.monotonic() + TIMEOUT_SECONDS
    for attempt in range(1, ATTEMPTS + 1):
        budget.spend()
        try:
            return declared.read(reader, change.id, settings.keys)
        except (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError) as error:
            if isinstance(error, stripe.RateLimitError):
                budget.pause(None)
            log(logging.WARNING, "stripe read failed", stripe_id=change.id, error=type(error).__name__)
            if attempt == ATTEMPTS or time.monotonic() + PAUSE_SECONDS >= deadline:
                return None
            time.sleep(PAUSE_SECONDS * attempt)
        except (stripe.StripeError, BadObjectId) as error:
            log(logging.WARNING, "stripe read refused", stripe_id=change.id, error=type(error).__name__)
            return None
    return None


Applying = Callable[[Change, Source], Applied | EventFailed]


def settled(
    apply: Applying, change: Change, source: Source, settings: Settings, budget: Budget
) -> Applied | EventFailed:
    """A change applied under the tie rule, its four steps in order, for two changes of one object
    in the same second (Stripe's `created` has one-second resolution):
      1. the event types order them (a .created comes first, a .deleted last), else
      2. an update's previous_attributes against the other event's payload: both decided in SQL
         (stripe_tie_order) when the change is applied, which answers `tie` when neither does;
      3. Stripe's state now, read and applied instead (not with STRIPE_REFETCH=never), else
      4. the change delivered last, applied with a note saying the tie was not settled."""
    return after_tie(apply, change, source, settings, budget, apply(change, source))


def after_tie(
    apply: Applying, change: Change, source: Source, settings: Settings, budget: Budget, result: Applied | EventFailed
) -> Applied | EventFailed:
    """The rule's steps 3 and 4, when the change's first application came to a tie."""
    if not isinstance(result, Applied) or result.status is not Status.TIE:
        return result
    fresh = state_now(settings, budget, change) if settings.refetch is not Refetch.NEVER else None
    if fresh is not None:
        again = apply(fresh, Source.API)
        return replace(again, settled_by=SettledBy.STRIPE) if isinstance(again, Applied) else again
    return apply(replace(change, tie="unsettled"), source)
