"""The deliveries one worker process receives at once go to Postgres together.

A thread that finds no statement of its process running sends its event at once, with every event
that queued meanwhile, as one statement and one commit (stripe_apply_batch: a subtransaction per
event, so one event's error fails that event alone). The others wait for that statement, and the
first of those that queued after it sends the next. Each thread gets its own event's outcome, after
the commit that holds it. Idle, a delivery goes alone and at once; under load, a round trip, a
commit and a backend's wake-up are shared by a few events, the largest part of Postgres' CPU per
event after the writes themselves (docs/performance.md). One statement at a time per process, on
purpose: with two or more in flight, the batches shrink and both sides spend more CPU per event.
"""

from __future__ import annotations

import _thread
import asyncio
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg2
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from webhook import database, metrics, store
from webhook.results import Applied, EventFailed
from webhook.store import EventToApply

# Postgres keeps up to 64 subtransactions of a transaction in shared memory; past that every
# snapshot taken while it runs gets slower. A worker has 8 threads by default anyway.
LIMIT = 16


def _lost_to_another(outcome: Applied | Exception) -> bool:
    return isinstance(outcome, EventFailed) and outcome.pgcode in database.RETRY_AT_ONCE


class Unreachable(Exception):
    """No statement ran: no connection could be had ('connect'), or it dropped twice ('disconnect')."""

    def __init__(self, kind: str, error: BaseException) -> None:
        super().__init__(kind)
        self.kind = kind
        self.error = error


def _taken_lock() -> _thread.LockType:
    lock = _thread.allocate_lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class _Queued:
    event: EventToApply
    order: tuple[str, str]  # customer, then event id: every statement takes its locks in one order
    # Released when the outcome is in, or when it is this event's turn to send: a bare lock, taken
    # at birth, is the cheapest wait threading has (Event adds a Condition and a lock per wait).
    turn: _thread.LockType = field(default_factory=_taken_lock)
    outcome: Applied | Exception | None = None


class Batches:
    def __init__(self, engine: Engine) -> None:
        # Weak: _BATCHES is keyed by the engine, and a strong reference here would keep both alive.
        self._engine = weakref.ref(engine)
        self._lock = threading.Lock()
        self._queue: list[_Queued] = []
        self._sending = False

    def apply(self, event_id: str, event: EventToApply) -> Applied:
        """The event's outcome name; raises EventFailed for its own error, Unreachable or the
        statement's error when the statement holding it failed as a whole."""
        # Every change names its customer (a customer's is itself); some take their customer's lock
        # too (a subscription moves its organization's tier).
        customer = "" if event.change is None else str(event.change["customer"])
        queued = _Queued(event, (customer, event_id))
        with self._lock:
            self._queue.append(queued)
            sends, self._sending = not self._sending, True
        if not sends:
            queued.turn.acquire()
        if queued.outcome is None:  # its turn to send: it is first in the queue
            self._send()
        if isinstance(queued.outcome, Exception):
            raise queued.outcome
        assert queued.outcome is not None
        return queued.outcome

    def _send(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[:LIMIT], self._queue[LIMIT:]
        try:
            for queued, outcome in zip(batch, self._statement(batch), strict=True):
                queued.outcome = outcome
        except Exception as error:
            if isinstance(error, Unreachable):
                # What queued meanwhile would wait for its own connect timeout in turn (a database
                # that accepts and never answers: 5 s more per statement); it gets the same answer.
                with self._lock:
                    batch, self._queue = batch + self._queue, []
            for queued in batch:
                queued.outcome = error
        finally:
            for queued in batch:
                if queued.outcome is None:  # interrupted (the worker is stopping)
                    queued.outcome = RuntimeError("the statement was interrupted")
            with self._lock:
                if self._queue:
                    self._queue[0].turn.release()  # outcome still None: it sends next
                else:
                    self._sending = False
            for queued in batch:
                if queued.turn.locked():
                    queued.turn.release()

    def _statement(self, batch: list[_Queued]) -> list[Applied | Exception]:
        outcomes = self._statement_once(batch)
        # A deadlock's victim (two statements each holding a lock the other's later event waits
        # for) lost nothing: its subtransaction was undone. The other statement can finish once
        # this one has committed, so the victim is sent again at once, not answered 503 for Stripe
        # to send it minutes later.
        for _ in range(database.RETRIES):
            lost = [n for n, outcome in enumerate(outcomes) if _lost_to_another(outcome)]
            if not lost:
                break
            for n, outcome in zip(lost, self._statement_once([batch[n] for n in lost]), strict=True):
                outcomes[n] = outcome
        return outcomes

    def _statement_once(self, batch: list[_Queued]) -> list[Applied | Exception]:
        try:
            return self._one_statement(batch)
        except (Unreachable, psycopg2.OperationalError):
            raise  # the database, not an event: every event of the statement is answered alike
        except Exception:
            if len(batch) == 1:
                raise
            # Each event's own error is caught inside the statement, so this should not happen;
            # if it does, each event alone shows whose it was rather than failing them all.
            return [self._alone(queued) for queued in batch]

    def _alone(self, queued: _Queued) -> Applied | Exception:
        try:
            return self._one_statement([queued])[0]
        except Exception as error:
            return error

    def _one_statement(self, batch: list[_Queued]) -> list[Applied | Exception]:
        engine = self._engine()
        assert engine is not None  # its caller holds it
        ordered = sorted(batch, key=lambda queued: queued.order)
        # A pooled connection that the server dropped (a restart, a failover) is not an outage:
        # the pool forgets every connection that old and the statement is tried once more on a new
        # one. Only when that fails too is the database unreachable.
        for attempt in (1, 2):
            try:
                connection = engine.raw_connection()
            except (psycopg2.Error, SQLAlchemyError) as error:  # none, or the pool stayed full for pool_timeout
                raise Unreachable("connect", error) from error
            try:
                outcomes = store.apply_events(
                    connection, [queued.event for queued in ordered], database.transaction_settings(engine)
                )
            except Exception as error:
                if not database.connection_lost(engine, connection, error):
                    raise
                if attempt == 2:
                    raise Unreachable("disconnect", error) from error
                metrics.DB_ERRORS.labels(kind="disconnect").inc()
                continue
            finally:
                connection.close()  # back to the pool
            by_queued: dict[_Queued, Applied | Exception] = dict(zip(ordered, outcomes, strict=True))
            return [by_queued[queued] for queued in batch]
        raise AssertionError("unreachable")


class LoopBatches:
    """The same rule for the deliveries an event loop holds (webhook/asgi.py): they queue in the
    loop, and one statement at a time carries all that queued meanwhile, on a thread of its own.
    No thread waits per delivery: the loop hands a thread a whole statement and is handed back its
    outcomes, one wake-up each way per statement rather than per event."""

    def __init__(self, batches: Batches) -> None:
        self._batches = batches
        self._queue: list[tuple[_Queued, asyncio.Future[Applied]]] = []
        self._sending = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="statement")

    async def apply(self, event_id: str, event: EventToApply) -> Applied:
        """As Batches.apply, awaited."""
        customer = "" if event.change is None else str(event.change["customer"])
        outcome: asyncio.Future[Applied] = asyncio.get_running_loop().create_future()
        self._queue.append((_Queued(event, (customer, event_id)), outcome))
        if not self._sending:
            self._sending = True
            # Sent once the loop has run what is ready now: the deliveries read in the same turn (a
            # burst, as senders often send in step) share this statement instead of the next one.
            asyncio.get_running_loop().call_soon(self._send)
        return await outcome

    def _send(self) -> None:
        batch, self._queue = self._queue[:LIMIT], self._queue[LIMIT:]
        running = asyncio.get_running_loop().run_in_executor(
            self._thread, self._batches._statement, [queued for queued, _ in batch]
        )
        running.add_done_callback(partial(self._sent, batch))

    def _sent(self, batch: list[tuple[_Queued, asyncio.Future[Applied]]], running: asyncio.Future[Any]) -> None:
        error = RuntimeError("the statement was interrupted") if running.cancelled() else running.exception()
        if isinstance(error, Unreachable):
            # As for threads: what queued meanwhile would wait for its own connect timeout in turn.
            batch, self._queue = batch + self._queue, []
        outcomes = [error] * len(batch) if error is not None else running.result()
        for (_, waiting), outcome in zip(batch, outcomes, strict=True):
            if waiting.done():  # its delivery was cancelled (the worker is stopping)
                continue
            if isinstance(outcome, Exception):
                waiting.set_exception(outcome)
            else:
                waiting.set_result(outcome)
        if self._queue:
            self._send()
        else:
            self._sending = False


_BATCHES: weakref.WeakKeyDictionary[Engine, Batches] = weakref.WeakKeyDictionary()
_ON_LOOP: weakref.WeakKeyDictionary[Engine, LoopBatches] = weakref.WeakKeyDictionary()
_BATCHES_LOCK = threading.Lock()


def batches(engine: Engine) -> Batches:
    """The engine's batches: one queue per engine and process."""
    with _BATCHES_LOCK:
        found = _BATCHES.get(engine)
        if found is None:
            found = _BATCHES[engine] = Batches(engine)
        return found


def on_loop(engine: Engine) -> LoopBatches:
    """The engine's batches for the event loop's deliveries (one loop per process)."""
    found = _ON_LOOP.get(engine)
    if found is None:
        found = _ON_LOOP[engine] = LoopBatches(Batches(engine))
    return found
