"""`heal`: the companion process that recovers what Stripe sent while nobody received it, fixes
drift, and keeps the log bounded, without a person.

Several may run (several hosts, through a transaction-mode pooler): a lease row in
stripe_sync_cursors, renewed by a heartbeat while a round runs, lets one work at a time; a holder
that dies stops renewing and another takes over once the lease lapses. Rounds are due by times kept
in the database, so a takeover neither repeats a round nor skips one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import stripe
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from webhook import jobs_store, stripe_api
from webhook.config import Settings
from webhook.logs import log
from webhook.process import DatabaseUnavailable
from webhook.prune import prune
from webhook.reconcile import FixRefused, check_fix, find_drift, fix_drift
from webhook.replay import replay_from_stripe

LEASE, EVENTS_CURSOR, STATE = jobs_store.Cursor.HEAL_LEASE, jobs_store.Cursor.HEAL_EVENTS, jobs_store.Cursor.HEAL_STATE
# Stripe lists an event by its `created`, but may make it visible a little later: each round looks
# this far behind where the last one started.
OVERLAP_SECONDS = 600
FIRST_WINDOW_SECONDS = 72 * 3600  # no cursor yet; `replay --from-stripe --since 30d` goes further
PRUNE_EVERY_SECONDS = 86400


@dataclass
class Round:
    recovered: int = 0  # events the log lacked, now processed
    failed: int = 0  # of those, still failing (kept as failed for replay)
    malformed: int = 0  # items of Stripe's list that are not events: skipped, not stored
    drift_found: int | None = None  # None: no reconciliation this round
    drift_fixed: int | None = None
    pruned: int | None = None
    error: str | None = None

    def line(self) -> str:
        parts = [f"recovered {self.recovered} events" + (f" ({self.failed} failed)" if self.failed else "")]
        if self.malformed:
            parts.append(f"skipped {self.malformed} malformed items")
        if self.drift_found is not None:
            parts.append(f"drift {self.drift_found} found, {self.drift_fixed} fixed")
        if self.pruned is not None:
            parts.append(f"pruned {self.pruned} events")
        return "heal round: " + "; ".join(parts) + (f"; FAILED: {self.error}" if self.error else "")


class Healer:
    def __init__(self, engine: Engine, settings: Settings, client: stripe.StripeClient) -> None:
        self.engine, self.settings, self.client = engine, settings, client
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # A dead holder is taken over within about one interval, and within half a minute at most.
        self.lease_seconds = min(30.0, max(3.0, float(settings.heal_interval)))

    def holds_lease(self) -> bool:
        return jobs_store.take_lease(self.engine, LEASE, self.holder, self.lease_seconds)

    def release_lease(self) -> None:
        jobs_store.release_lease(self.engine, LEASE, self.holder)

    def due(self, now: float) -> bool:
        last = jobs_store.saved_json(self.engine, STATE).get("last_round", 0)
        return now - float(last) >= self.settings.heal_interval

    def run_round(self, stop: threading.Event | None = None) -> Round | None:
        """One round, if this process holds the lease; None when another does."""
        if not self.holds_lease():
            return None
        stop = stop or threading.Event()
        finished = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(finished,), daemon=True)
        heartbeat.start()
        try:
            return self._round(stop)
        finally:
            finished.set()
            heartbeat.join()
            self.release_lease()  # the next due round is anyone's

    def _heartbeat(self, finished: threading.Event) -> None:
        while not finished.wait(self.lease_seconds / 3):
            try:
                if not self.holds_lease():
                    log(logging.ERROR, "heal lost its lease to another process", holder=self.holder)
            except SQLAlchemyError:
                pass  # the round itself will fail on the database and say so

    def _round(self, stop: threading.Event) -> Round:
        started = time.time()
        state = jobs_store.saved_json(self.engine, STATE)
        result = Round()
        try:
            self._recover(started, result, stop)
            reconcile = self.settings.reconcile_interval
            if reconcile and started - float(state.get("last_reconcile", 0)) >= reconcile and not stop.is_set():
                self._reconcile(result)
                state.update(last_reconcile=started, drift_found=result.drift_found, drift_fixed=result.drift_fixed)
            retention = self.settings.event_retention_days
            if retention and started - float(state.get("last_prune", 0)) >= PRUNE_EVERY_SECONDS:
                result.pruned = prune(self.engine, retention * 86400, stop=stop).deleted
                state["last_prune"] = started
            state["last_success"] = started
        except stripe.StripeError as error:
            result.error = stripe_api.explain(error)
        except (SQLAlchemyError, DatabaseUnavailable) as error:
            result.error = f"database: {type(error).__name__}"
        except FixRefused as refusal:
            result.error = f"reconcile refused: {refusal}"
        if stop.is_set():  # stopped part-way: the round is still due, for whichever process is next
            return result
        state.update(last_round=started, round=asdict(result))
        jobs_store.save_cursor(self.engine, STATE, json.dumps(state))
        log(logging.ERROR if result.error else logging.INFO, result.line(), holder=self.holder)
        return result

    def _recover(self, started: float, result: Round, stop: threading.Event) -> None:
        cursor = jobs_store.saved_cursor(self.engine, EVENTS_CURSOR)
        since = int(cursor) - OVERLAP_SECONDS if cursor else int(started) - FIRST_WINDOW_SECONDS
        floor = int(started) - stripe_api.EVENTS_KEPT_SECONDS + 3600  # an hour inside what Stripe still has
        if self.settings.event_retention_days:  # older ones may have been pruned: not missing
            floor = max(floor, int(started) - self.settings.event_retention_days * 86400)
        summary = replay_from_stripe(self.engine, self.settings, self.client, since=max(since, floor), stop=stop)
        result.recovered, result.failed = sum(summary.outcomes.values()), summary.outcomes["failed"]
        result.malformed = summary.malformed
        if not stop.is_set():
            jobs_store.save_cursor(self.engine, EVENTS_CURSOR, str(int(started)))

    def _reconcile(self, result: Round) -> None:
        as_of = int(time.time())
        checked, drifts = find_drift(self.engine, self.client, self.settings.keys)
        result.drift_found, result.drift_fixed = len(drifts), 0
        if drifts:
            assert self.settings.stripe_api_key is not None  # the client needed it
            check_fix(self.engine, self.settings.stripe_api_key, checked, drifts, allow_mass_delete=False)
            result.drift_fixed = fix_drift(self.engine, drifts, as_of).count("processed")

    def run_forever(self, stop: threading.Event) -> None:
        """Until stop is set: a round whenever one is due and this process holds the lease."""
        while not stop.is_set():
            try:
                if self.due(time.time()):
                    self.run_round(stop)
            except (SQLAlchemyError, DatabaseUnavailable) as error:
                log(logging.ERROR, "heal: database unavailable; trying again", error=type(error).__name__)
            stop.wait(min(self.lease_seconds / 3, float(self.settings.heal_interval)))
