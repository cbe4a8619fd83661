"""Thin notifications, answered at once and read in the background (docs/reference.md, "Thin notifications").

A delivery logs the notification as `received` and adds it to its object's row of
stripe_thin_waiting, in one statement, and is answered 200 "queued": no Stripe call happens while
Stripe waits for the answer, so a slow Stripe never holds a delivery. Reader threads in every serve
process (and in heal) take rows up, each under a lease, read the object once for every notification
waiting on it, within the deployment's read budget (webhook/budget.py), and apply it in one
transaction (stripe_thin_settle). Postgres is the queue: the rows are shared by every host, a lease
that lapses with a dead process lets another take its row, and nothing is held between statements
(pooler-safe). A process wakes its own readers when it queues; the others look every half second.

A read Stripe refuses in a way a retry can fix (5xx, 429, a timeout) puts the row back with an
exponential back-off for as long as Stripe would retry a delivery (3 days), then its notifications
fail; a 404 or another 4xx fails them at once, with the reason, for `replay`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import uuid
from dataclasses import dataclass

import psycopg2
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from webhook import budget, database, metrics, refetch, thin
from webhook.budget import PAUSE_SECONDS, Budget
from webhook.config import Settings
from webhook.logs import log
from webhook.objects import Change
from webhook.results import Applied, EventFailed, Source, from_row
from webhook.signature import Event, parse_event

LEASE_SECONDS = 15  # a read takes thin.READ_TIMEOUT_SECONDS at most, its token a little more
POLL_SECONDS = 0.5  # how often an idle reader looks for work queued by another process
READERS = 4  # threads a process reads with: enough to use a test-mode account's 25 reads a second
POOL_SIZE = 2  # the readers' own connections: a statement each between reads, never a delivery's
GIVE_UP_SECONDS = 3 * 86400  # Stripe retries a delivery for up to 3 days
BACKOFF_MAX_SECONDS = 300
_BOUNDED = "SET LOCAL statement_timeout = '5s'; SET LOCAL lock_timeout = '2s'; "

# Logged and queued in one statement. A notification already settled (processed, ignored, stale)
# is a duplicate: nothing is written. One waiting already is counted, and costs no second read;
# a failed one that Stripe delivers again waits again.
_ENQUEUE = (
    _BOUNDED
    + """
    WITH logged AS (
      INSERT INTO public.stripe_webhook_events AS e
        (id, type, api_version, livemode, created, payload, status, attempts, stripe_customer_id)
      SELECT %(id)s, %(type)s, NULL, %(livemode)s, to_timestamp(%(created)s), p, 'received', 1,
             public.stripe_event_customer_id(p)
      FROM (SELECT %(payload)s::jsonb AS p) AS delivery
      ON CONFLICT (id) DO UPDATE SET attempts = e.attempts + 1, status = 'received', last_error = NULL
        WHERE e.status IN ('received', 'failed')
      RETURNING e.id
    ), waiting AS (
      INSERT INTO public.stripe_thin_waiting AS w (object_key, event_ids)
      SELECT %(key)s, ARRAY[id] FROM logged
      ON CONFLICT (object_key) DO UPDATE SET event_ids = w.event_ids || EXCLUDED.event_ids
        WHERE NOT EXCLUDED.event_ids <@ w.event_ids
    )
    SELECT count(*) FROM logged
    """
)

# The row due first that nobody holds, leased to this reader, with its notifications' payloads.
_CLAIM = (
    _BOUNDED
    + """
    WITH taken AS (
      UPDATE public.stripe_thin_waiting SET leased_until = now() + make_interval(secs => %(lease)s), holder = %(holder)s
      WHERE object_key = (
        SELECT object_key FROM public.stripe_thin_waiting
        WHERE not_before <= now() AND (leased_until IS NULL OR leased_until < now())
        ORDER BY not_before LIMIT 1 FOR UPDATE SKIP LOCKED)
      RETURNING object_key, event_ids, failing_since
    )
    SELECT taken.object_key, taken.event_ids, taken.failing_since IS NOT NULL
             AND taken.failing_since < now() - make_interval(secs => %(give_up)s),
           e.id, e.payload::text
    FROM taken LEFT JOIN public.stripe_webhook_events e
      ON e.id = ANY (taken.event_ids) AND e.status IN ('received', 'failed')
    ORDER BY e.created, e.id
    """
)

_SETTLE = (
    _BOUNDED
    + "SELECT (o).status, (o).settled_by, (o).sqlstate, (o).message "
    + "FROM (SELECT public.stripe_thin_settle(%(key)s, %(holder)s, %(ids)s, %(event)s, %(change)s) AS o) AS settled"
)

_BACK_OFF = (
    _BOUNDED
    + """
    UPDATE public.stripe_thin_waiting SET leased_until = NULL, holder = NULL, attempts = attempts + 1,
      failing_since = coalesce(failing_since, now()), last_error = %(error)s,
      not_before = now() + make_interval(secs => least(%(most)s, 2 ^ least(attempts, 20)) * (0.75 + random() / 2))
    WHERE object_key = %(key)s AND holder = %(holder)s
    """
)

_RELEASE = "SELECT public.stripe_thin_release(%(key)s, %(holder)s, %(ids)s)"
_FAIL = (
    _BOUNDED
    + """
    UPDATE public.stripe_webhook_events SET status = 'failed', last_error = %(error)s
    WHERE id = ANY (%(ids)s) AND status IN ('received', 'failed');
    """
    + _RELEASE
)


@dataclass(frozen=True)
class Claim:
    key: str
    events: list[Event]  # the waiting notifications, oldest first; the last carries the read
    ids: list[str]  # every id the row named when it was taken (some may have been settled since)
    expired: bool  # failing for longer than Stripe retries a delivery


_execute = database.run_raw


_wake = threading.Semaphore(0)


def enqueue(engine: Engine, event: Event, payload: str) -> bool:
    """Log a wanted thin notification as received and queue it; False for a duplicate of one
    already settled. Raises the database's error (the caller answers 503)."""
    rows = _execute(
        engine,
        _ENQUEUE,
        {
            "id": event.id,
            "type": event.type,
            "livemode": event.livemode,
            "created": event.created,
            "payload": payload,
            "key": thin.object_key(event),
        },
    )
    queued = bool(rows and rows[0][0])
    if queued:
        _wake.release()  # this process' readers start at once; the others find it when they look
    return queued


class Reader:
    """Takes waiting rows up, one at a time, and settles them."""

    def __init__(self, engine: Engine, settings: Settings, budget: Budget) -> None:
        self.engine, self.settings, self.budget = engine, settings, budget
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def claim(self) -> Claim | None:
        rows = _execute(
            self.engine, _CLAIM, {"lease": LEASE_SECONDS, "holder": self.holder, "give_up": GIVE_UP_SECONDS}
        )
        if not rows:
            return None
        key, ids, expired = str(rows[0][0]), [str(i) for i in rows[0][1]], bool(rows[0][2])
        events = [parse_event(str(payload)) for _, _, _, event_id, payload in rows if event_id is not None]
        return Claim(key, events, ids, expired)

    def work_once(self) -> bool:
        """Take up one row and settle it; False when none is due."""
        claim = self.claim()
        if claim is None:
            return False
        if not claim.events:  # every notification it named was settled meanwhile
            _execute(self.engine, _BOUNDED + _RELEASE, {"key": claim.key, "holder": self.holder, "ids": claim.ids})
            return True
        try:
            self._serve(claim)
        except (SQLAlchemyError, psycopg2.Error) as error:
            # The database, not the read: the lease lapses and the row is taken up again.
            log(logging.WARNING, "thin read not applied", object=claim.key, error=type(error).__name__)
        return True

    def _serve(self, claim: Claim) -> None:
        carrier = claim.events[-1]  # the newest: the read is made after it arrived
        try:
            # Each request waits for its token; a 429 has paused every process already.
            change = thin.read(thin.client_for(self.settings, self.budget), carrier, self.settings)
        except thin.NotYet as refusal:
            if claim.expired:
                self._fail(claim, f"Stripe kept refusing the read for 3 days: {refusal}")
                return
            # A rate limit is the account's, not the object's: it waits out the pause alone.
            most = (refusal.retry_after or PAUSE_SECONDS) if refusal.rate_limited else BACKOFF_MAX_SECONDS
            _execute(
                self.engine, _BACK_OFF, {"key": claim.key, "holder": self.holder, "error": str(refusal), "most": most}
            )
            log(logging.WARNING, "thin read refused; read again later", object=claim.key, error=str(refusal))
            return
        except (thin.Refused, thin.ThinNeedsKey) as refusal:
            self._fail(claim, str(refusal))
            return
        except Exception as error:  # a read Stripe answered with something no handler takes
            self._fail(claim, f"{type(error).__name__}: {error}")
            return
        self._settle(claim, carrier, change)

    def _settle(self, claim: Claim, carrier: Event, change: Change) -> None:
        # A snapshot event of the same second as Stripe's clock ties as any two events do.
        outcome = refetch.settled(
            lambda state, _: self._apply(claim, carrier, state), change, Source.THIN, self.settings, self.budget
        )
        if isinstance(outcome, Applied) and outcome.settled_by is not None:
            metrics.TIES.labels(settled_by=outcome.settled_by.value).inc()
        if isinstance(outcome, EventFailed):
            self._fail(claim, outcome.describe())
            return
        metrics.THIN_COALESCED.inc(max(0, len(claim.events) - 1))
        for event in claim.events:
            metrics.EVENTS.labels(type=event.type, outcome=outcome.status.value).inc()
        log(
            logging.INFO,
            "thin read applied",
            object=claim.key,
            notifications=len(claim.events),
            outcome=outcome.status.value,
            stripe_customer_id=change.customer,
        )

    def _apply(self, claim: Claim, carrier: Event, change: Change) -> Applied | EventFailed:
        rows = _execute(
            self.engine,
            _SETTLE,
            {
                "key": claim.key,
                "holder": self.holder,
                "ids": claim.ids,
                "event": carrier.payload,
                "change": json.dumps(change.as_json()),
            },
        )
        return from_row(*rows[0])

    def _fail(self, claim: Claim, reason: str) -> None:
        _execute(self.engine, _FAIL, {"key": claim.key, "holder": self.holder, "ids": claim.ids, "error": reason})
        for event in claim.events:
            metrics.EVENTS.labels(type=event.type, outcome="failed").inc()
        log(logging.ERROR, "thin notifications failed", object=claim.key, count=len(claim.events), error=reason)

    def drain(self, stop: threading.Event | None = None) -> int:
        """Settle every row due now (heal --once, tests); how many were taken up."""
        taken = 0
        while not (stop is not None and stop.is_set()) and self.work_once():
            taken += 1
        return taken

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                busy = self.work_once()
            except Exception as error:  # the database away: look again later, never die
                log(logging.WARNING, "thin reader waiting", error=type(error).__name__)
                busy = False
            if not busy:
                # Woken by this process' next notification, or looking again after a while (with
                # a little jitter, so that the processes do not all look at the same instant).
                _wake.acquire(timeout=POLL_SECONDS * (0.75 + random.random() / 2))


def start(engine: Engine, settings: Settings, threads: int = READERS) -> threading.Event:
    """Reader threads for this process (daemons: a lease left by a stop lapses, and another
    process takes its row up); set the returned event to stop them."""
    stop = threading.Event()
    readers_budget = budget.shared(engine, settings.stripe_api_rate)
    for n in range(threads):
        reader = Reader(engine, settings, readers_budget)
        threading.Thread(target=reader.run, args=(stop,), name=f"thin-reader-{n}", daemon=True).start()
    return stop
