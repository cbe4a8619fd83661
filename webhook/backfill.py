"""`backfill`: every Stripe customer into stripe_customers, in batches of one statement each, with a
cursor in the database so that a run stopped by Stripe (or anything else) resumes where it was."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import stripe
from sqlalchemy import Engine

from webhook import jobs_store, store, stripe_api
from webhook.config import Keys
from webhook.handlers import (
    EntitlementsChange,
    customer_state,
    entitlement,
    payment_method_state,
    subscription_state,
)
from webhook.results import Source

BATCH = 500
CURSOR = jobs_store.Cursor.BACKFILL


@dataclass
class Backfill:
    outcomes: Counter[str] = field(default_factory=Counter)
    billing: Counter[str] = field(default_factory=Counter)  # subscriptions and entitlement sets written/kept
    resumed_after: str | None = None
    stopped_after: str | None = None  # the last customer written, when the run did not finish
    failed: stripe.StripeError | None = None

    def summary(self) -> str:
        resumed = f" (resumed after {self.resumed_after})" if self.resumed_after else ""
        billing = (
            f"; then {self.billing['subscriptions']} subscriptions and {self.billing['entitlement sets']} entitlement "
            f"sets: {self.billing['processed']} written, {self.billing['stale']} kept"
            if self.billing
            else ""
        )
        return (
            f"backfilled {sum(self.outcomes.values())} customers{resumed}: {self.outcomes['processed']} written, "
            f"{self.outcomes['stale']} kept (a newer event already set them){billing}"
        )


def backfill(
    engine: Engine,
    client: stripe.StripeClient,
    keys: Keys,
    progress: Callable[[int], None] = lambda done: None,
    from_start: bool = False,
) -> Backfill:
    """Upsert every live Stripe customer with sync.source 'backfill'. The state read from the API
    is as of the run's start, so any row an event set after that start is left as it is. When the
    listing fails for good (after the client's retries), what was already read is written and the
    cursor kept; the error is in the result."""
    as_of = int(time.time())
    run = Backfill(resumed_after=None if from_start else jobs_store.saved_cursor(engine, CURSOR))
    batch: list[dict[str, Any]] = []

    def write() -> None:
        changes = [customer_state(customer, keys).as_json() for customer in batch]
        run.outcomes.update(store.apply_states(engine, changes, Source.BACKFILL, as_of))
        run.stopped_after = batch[-1]["id"]
        jobs_store.save_cursor(engine, CURSOR, run.stopped_after)
        batch.clear()
        progress(sum(run.outcomes.values()))

    try:
        for customer in stripe_api.list_customers(client, after=run.resumed_after):
            batch.append(customer)
            if len(batch) == BATCH:
                write()
    except stripe.StripeError as error:
        run.failed = error
    if batch:
        write()
    if run.failed is None:
        run.stopped_after = None
        jobs_store.save_cursor(engine, CURSOR, None)
        try:
            _billing(engine, client, keys, as_of, run)
        except stripe.StripeError as error:
            run.failed = error
    return run


def _billing(engine: Engine, client: stripe.StripeClient, keys: Keys, as_of: int, run: Backfill) -> None:
    """Every subscription (canceled ones too), then the active entitlements and payment methods of
    each customer that has a subscription or an entitlement set here (entitlements come from subscribed products; a
    read per customer, so not for customers that never subscribed), written as the customers are:
    as of the run's start, never over a newer event's state."""
    states = [subscription_state(found, keys) for found in stripe_api.list_subscriptions(client)]
    changes = [state.as_json() for state in states]
    run.billing["subscriptions"] = len(changes)
    for start in range(0, len(changes), BATCH):
        run.billing.update(store.apply_states(engine, changes[start : start + BATCH], Source.BACKFILL, as_of))
    with engine.connect() as connection:
        customers = sorted({state.customer for state in states} | set(store.local_entitlement_sets(connection)))
    for customer_id in customers:
        active = [entitlement(item) for item in stripe_api.list_active_entitlements(client, customer_id)]
        change = EntitlementsChange(id=customer_id, entitlements=[a for a in active if a["lookup_key"]], complete=True)
        methods = [
            payment_method_state(found, customer_id) for found in stripe_api.list_payment_methods(client, customer_id)
        ]
        changes = [change.as_json(), *(method.as_json() for method in methods)]
        run.billing.update(store.apply_states(engine, changes, Source.BACKFILL, as_of))
        run.billing["entitlement sets"] += 1
