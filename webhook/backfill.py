"""`backfill`: every declared object Stripe has into its table, in batches of one statement each,
with a cursor per object in the database so that a run stopped by Stripe (or anything else)
resumes where it was.

Objects of the whole account (customers, subscriptions) are listed once; objects listed per
customer (entitlement sets, payment methods) are read for each customer that has something here
beyond its own row: a read per customer, so not for customers that never subscribed."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import stripe
from sqlalchemy import Engine

from webhook import jobs_store, objects, objects_store, stripe_api
from webhook.config import Keys
from webhook.objects import Change, Reader, StripeObject
from webhook.results import Source

BATCH = 500


@dataclass
class Backfill:
    counts: Counter[str] = field(default_factory=Counter)  # objects read, by declared name
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)  # processed / stale, by declared name
    resumed_after: str | None = None  # where the first object's listing resumed
    stopped_after: str | None = None  # the last object written, when the run did not finish
    failed: stripe.StripeError | None = None

    def summary(self) -> str:
        first, *rest = objects.OBJECTS
        resumed = f" (resumed after {self.resumed_after})" if self.resumed_after else ""
        line = f"backfilled {self.counts[first.name]} {first.plural}{resumed}: " + self._written([first])
        done = [declared for declared in rest if declared.name in self.outcomes]
        if done:
            named = [f"{self.counts[declared.name]} {declared.plural}" for declared in done]
            listed = ", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else named[0]
            line += f"; then {listed}: " + self._written(done)
        return line

    def _written(self, declared: list[StripeObject]) -> str:
        total = sum((self.outcomes.get(one.name, Counter()) for one in declared), Counter())
        kept = " (a newer event already set them)" if declared[0] is objects.OBJECTS[0] else ""
        return f"{total['processed']} written, {total['stale']} kept{kept}"


def backfill(
    engine: Engine,
    client: stripe.StripeClient,
    keys: Keys,
    progress: Callable[[int], None] = lambda done: None,
    from_start: bool = False,
    since: dict[str, int] | None = None,
) -> Backfill:
    """Upsert every object Stripe has with sync.source 'backfill'. The state read from the API is
    as of the run's start, so any row an event set after that start is left as it is. When a
    listing fails for good (after the client's retries), what was already read is written and the
    cursor kept; the error is in the result. since: for an object named in it, every one created
    since that unix time rather than its listing's default (invoices: the open ones)."""
    as_of = int(time.time())
    reader = stripe_api.reader(client)
    run = Backfill()
    for declared in objects.OBJECTS:
        cursor = f"{jobs_store.Cursor.BACKFILL}:{declared.name}"
        after = None if from_start else jobs_store.saved_cursor(engine, cursor)
        if declared is objects.OBJECTS[0]:
            run.resumed_after = after
        outcomes = run.outcomes[declared.name] = Counter()
        try:
            listing = _listing(engine, reader, declared, keys, after, (since or {}).get(declared.name))
            for batch in _batches(listing):
                outcomes.update(
                    objects_store.apply_states(engine, [c.as_json() for c, _ in batch], Source.BACKFILL, as_of)
                )
                run.counts[declared.name] += len(batch)
                run.stopped_after = batch[-1][1]
                jobs_store.save_cursor(engine, cursor, run.stopped_after)
                progress(sum(run.counts.values()))
        except stripe.StripeError as error:
            run.failed = error
            return run
        run.stopped_after = None
        jobs_store.save_cursor(engine, cursor, None)
    return run


def _listing(
    engine: Engine, reader: Reader, declared: StripeObject, keys: Keys, after: str | None, since: int | None
) -> Iterator[tuple[Change, str]]:
    """The object's changes, each with where a resumed run starts after it."""
    extra = {} if since is None else {"since": since}
    if declared.scope == "account":
        for change in declared.listing(reader, keys, after, **extra):
            yield change, change.id
        return
    for customer in objects_store.customers_with_objects(engine):
        if after is not None and customer <= after:
            continue
        # A customer's list whole before any of it is written: the cursor then never points past
        # a customer read only in part.
        for change in list(declared.listing(reader, customer, keys, **extra)):
            yield change, customer


def _batches(listing: Iterator[tuple[Change, str]]) -> Iterator[list[tuple[Change, str]]]:
    """BATCH at a time, never splitting one resume point's changes (a customer's methods)."""
    batch: list[tuple[Change, str]] = []
    try:
        for change, resume in listing:
            if len(batch) >= BATCH and batch[-1][1] != resume:
                yield batch
                batch = []
            batch.append((change, resume))
    except stripe.StripeError:
        if batch:  # what was read before Stripe failed is written, and the cursor kept there
            yield batch
        raise
    if batch:
        yield batch
