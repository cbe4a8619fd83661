"""`backfill`: every Stripe customer into stripe_customers, in batches of one statement each."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import stripe
from sqlalchemy import Engine

from webhook import store, stripe_api
from webhook.handlers import customer_state

BATCH = 500


def _batches(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while batch := list(islice(items, size)):
        yield batch


def backfill(
    engine: Engine,
    client: stripe.StripeClient,
    user_id_key: str,
    progress: Callable[[int], None] = lambda done: None,
) -> Counter[str]:
    """Upsert every live Stripe customer with sync.source 'backfill'. The state read from the API
    is as of the run's start, so any row an event set after that start is left as it is."""
    as_of = int(time.time())
    outcomes: Counter[str] = Counter()
    customers = stripe_api.list_customers(client)
    for batch in _batches(customers, BATCH):
        changes = [customer_state(customer, user_id_key).as_json() for customer in batch]
        outcomes.update(store.apply_customers(engine, changes, "backfill", as_of))
        progress(sum(outcomes.values()))
    return outcomes
