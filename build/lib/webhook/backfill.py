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
from webhook.handlers import customer_state
from webhook.results import Source

BATCH = 500
CURSOR = jobs_store.Cursor.BACKFILL


@dataclass
class Backfill:
    outcomes: Counter[str] = field(default_factory=Counter)
    resumed_after: str | None = None
    stopped_after: str | None = None  # the last customer written, when the run did not finish
    failed: stripe.StripeError | None = None

    def summary(self) -> str:
        resumed = f" (resumed after {self.resumed_after})" if self.resumed_after else ""
        return (
            f"backfilled {sum(self.outcomes.values())} customers{resumed}: {self.outcomes['processed']} written, "
            f"{self.outcomes['stale']} kept (a newer event already set them)"
        )


def backfill(
    engine: Engine,
    client: stripe.StripeClient,
    user_id_key: str,
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
        changes = [customer_state(customer, user_id_key).as_json() for customer in batch]
        run.outcomes.update(store.apply_customers(engine, changes, Source.BACKFILL, as_of))
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
    return run
