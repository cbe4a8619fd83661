"""Running events through process_event again: stored ones (`replay`), and ones Stripe sent while
nobody received them (`replay --from-stripe`)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import stripe
from sqlalchemy import Engine

from webhook import store, stripe_api
from webhook.config import Settings
from webhook.objects import HANDLERS
from webhook.process import ProcessingFailed, StripeUnavailable, process_event
from webhook.results import Source
from webhook.signature import RejectedDelivery, parse_event


@dataclass
class ReplaySummary:
    outcomes: Counter[str] = field(default_factory=Counter)
    skipped: int = 0  # already in the log (from Stripe only)
    malformed: int = 0  # not the shape of an event: not run, and (from Stripe) not stored either
    failures: list[str] = field(default_factory=list)  # "evt_…: why", one per failing or malformed event

    @property
    def failed(self) -> int:
        return self.outcomes["failed"] + self.malformed

    def line(self) -> str:
        total = sum(self.outcomes.values())
        parts = ", ".join(f"{count} {name}" for name, count in sorted(self.outcomes.items()))
        skipped = f"; {self.skipped} already logged" if self.skipped else ""
        malformed = f"; {self.malformed} malformed, skipped" if self.malformed else ""
        return f"replayed {total}: {parts or 'nothing to do'}{skipped}{malformed}"


def _run(
    engine: Engine,
    events: Iterable[tuple[str, str]],
    settings: Settings,
    summary: ReplaySummary,
    actor: str | None = None,
) -> None:
    for event_id, payload in events:
        try:
            event = parse_event(payload)
        except RejectedDelivery as malformed:
            summary.malformed += 1
            summary.failures.append(f"{event_id}: malformed, skipped: {malformed}")
            continue
        try:
            outcome = process_event(engine, event, settings, source=Source.REPLAY, actor=actor).value
        except ProcessingFailed as failure:
            outcome = "failed"
            summary.failures.append(f"{event_id}: {failure}")
        except StripeUnavailable as unread:  # a thin event: kept as it was, read again later
            outcome = "failed"
            summary.failures.append(f"{event_id}: Stripe could not be read ({unread}); kept as it was")
        summary.outcomes[outcome] += 1


def replay_stored(
    engine: Engine,
    settings: Settings,
    *,
    event_id: str | None,
    status: str,
    since_seconds: int | None,
    actor: str | None = None,
) -> ReplaySummary:
    with engine.connect() as connection:
        selected = store.select_events(connection, event_id=event_id, status=status, since_seconds=since_seconds)
    summary = ReplaySummary()
    _run(engine, selected, settings, summary, actor)
    return summary


def _replay_missing(engine: Engine, settings: Settings, events: list[dict[str, Any]], summary: ReplaySummary) -> None:
    """Process those of `events` (from Stripe's Events API) that the log lacks, oldest first."""
    with engine.connect() as connection:
        logged = store.logged_event_ids(connection, [str(event.get("id")) for event in events])
    missing = sorted(
        (event for event in events if event.get("id") not in logged),
        key=lambda event: created if isinstance(created := event.get("created"), int) else 0,
    )
    summary.skipped += len(events) - len(missing)
    _run(engine, ((str(event.get("id")), json.dumps(event)) for event in missing), settings, summary)


def replay_from_stripe(
    engine: Engine, settings: Settings, client: stripe.StripeClient, *, since: int, stop: threading.Event | None = None
) -> ReplaySummary:
    """Process the handled events Stripe has from `since` on that the log lacks: deliveries that
    never arrived (endpoint down, secret misconfigured). A page at a time, each oldest first; the
    order across pages does not matter (each customer's events are ordered by the database)."""
    summary = ReplaySummary()
    page: list[dict[str, Any]] = []
    for event in stripe_api.list_events(client, since, sorted(HANDLERS)):
        page.append(event)
        if len(page) == stripe_api.PAGE:
            _replay_missing(engine, settings, page, summary)
            page = []
            if stop is not None and stop.is_set():
                return summary
    _replay_missing(engine, settings, page, summary)
    return summary
