"""The one door to the database for events: the endpoint and `replay` both come through here,
so the ordering, duplicate and failure rules cannot drift apart."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import replace
from enum import StrEnum
from functools import partial
from typing import Any, NoReturn

import psycopg2
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from webhook import batch, budget, database, metrics, objects, refetch, store, thin, thin_queue
from webhook.config import Refetch, Settings
from webhook.logs import log
from webhook.objects import HANDLERS, Change
from webhook.results import Applied, EventFailed, Source, Status
from webhook.signature import Event


class Outcome(StrEnum):
    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    STALE = "stale"
    QUEUED = "queued"  # a thin notification, logged and waiting for its read (webhook/thin_queue.py)


class DatabaseUnavailable(Exception):
    """Nothing was written; the delivery should be retried later."""


class StripeUnavailable(Exception):
    """A replayed thin event's object could not be read from Stripe in time: kept as it was."""


class ProcessingFailed(Exception):
    """The event is logged as failed with its error, for a retry or `replay`. `shown`: a reason the
    answer may say (a configuration the operator must fix), where others only say it failed."""

    def __init__(self, event_id: str, error: str, shown: str | None = None) -> None:
        super().__init__(error)
        self.event_id = event_id
        self.error = error
        self.shown = shown


def change_for(event: Event, settings: Settings) -> Change | None:
    """The change the event asks for; None means log it as ignored."""
    if settings.expect_livemode is not None and event.livemode != settings.expect_livemode:
        return None
    handler = HANDLERS.get(event.type)
    return None if handler is None else handler(event.object, settings.keys)


def _completed(change: Change, settings: Settings, shared: budget.Budget) -> Change:
    """A change that says it is not whole (a summary listing only part of a set) is read whole from
    Stripe (with the key) before it is applied; without the key, or when Stripe cannot answer in
    time, it is stored as far as it goes and marked incomplete, with a note saying why."""
    if change.complete:
        return change
    if settings.stripe_api_key is None:
        return change.incomplete("no API key to read the rest")
    whole = refetch.state_now(settings, shared, change)
    return change.incomplete("Stripe could not be read for the rest") if whole is None else replace(whole, as_of=None)


def describe(error: BaseException) -> str:
    """An error as last_error and log text: the primary message only. Postgres' DETAIL would
    repeat the failing row, customer email included."""
    if isinstance(error, EventFailed):
        return error.describe()
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    if isinstance(cause, psycopg2.Error) and cause.diag.message_primary:
        return f"{type(cause).__name__}: {cause.diag.message_primary}"
    if isinstance(cause, psycopg2.Error):
        # A connection that failed has no diagnostics, only libpq's text: its first line says what
        # failed ("password authentication failed for user …", "Connection refused", "timeout
        # expired") and never holds the password.
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        return f"{type(cause).__name__}: {first}"
    return f"{type(error).__name__}: {error}"


_last_unavailable: list[str] = [""]


def unavailable(engine: Engine, error: BaseException, kind: str) -> DatabaseUnavailable:
    """The database cannot take the event now: counted, and logged with where it is (never the
    password) each time the kind of failure changes, so a wrong password or a refused connection
    shows in the server's log without one line per delivery."""
    metrics.DB_ERRORS.labels(kind=kind).inc()
    reason = describe(error)
    if reason != _last_unavailable[0]:
        _last_unavailable[0] = reason
        log(logging.ERROR, "database unavailable", database=database.describe_target(str(engine.url)), error=reason)
    return DatabaseUnavailable(reason)


def process_event(
    engine: Engine, event: Event, settings: Settings, source: Source = Source.WEBHOOK, actor: str | None = None
) -> Outcome:
    """Apply one verified event; `actor` names a person acting from the support console (audit)."""
    started = time.perf_counter()
    if event.thin and source is Source.WEBHOOK and thin.wanted(event, settings):
        return _queue(engine, event, settings)
    shared = budget.shared(engine, settings.stripe_api_rate)  # the deployment's reads of Stripe
    if event.thin:
        change, source = _thin_change(engine, event, settings, shared), Source.THIN
    else:
        found = change_for(event, settings)
        change = None if found is None else _completed(found, settings, shared)
    # A thin event's change is a fresh read already. If Stripe cannot be read in time, the event's
    # own state goes through the ordering rules instead.
    if not event.thin and change is not None and _read_instead(change, settings):
        fresh = refetch.state_now(settings, shared, change)
        change, source = (change, source) if fresh is None else (fresh, Source.API)

    def apply(state: Change | None, applied_as: Source) -> Applied:
        return _apply(engine, event, state, applied_as, actor)

    # Only a change can tie; a delivery with none is only logged.
    result = apply(change, source) if change is None else refetch.settled(apply, change, source, settings, shared)
    return _finish(event, change, source, result, started)


async def process_delivery(engine: Engine, event: Event, settings: Settings, threads: Executor) -> Outcome:
    """process_event for a delivery, from the event loop (webhook/asgi.py). The common case, a
    snapshot event whose change is whole and needs no read of Stripe, goes through the loop's
    batches (webhook/batch.py) without a thread of its own; whatever may wait on Stripe or on more
    than one statement (thin notifications, partial changes, STRIPE_REFETCH=always, a tie to settle,
    an error to record) runs on `threads`, through the same functions as process_event."""
    loop, started = asyncio.get_running_loop(), time.perf_counter()
    found = None if event.thin else change_for(event, settings)
    if event.thin or (found is not None and (not found.complete or _read_instead(found, settings))):
        return await loop.run_in_executor(threads, process_event, engine, event, settings)
    try:
        applied = await batch.on_loop(engine).apply(event.id, _to_apply(event, found, Source.WEBHOOK, None))
    except Exception as error:
        await loop.run_in_executor(threads, _failed, engine, event, error)
        raise AssertionError("_failed raises") from error
    if found is None or applied.status is not Status.TIE:
        return _finish(event, found, Source.WEBHOOK, applied, started)

    def settle() -> Applied | EventFailed:
        apply = partial(_apply, engine, event, actor=None)
        shared = budget.shared(engine, settings.stripe_api_rate)
        return refetch.after_tie(apply, found, Source.WEBHOOK, settings, shared, applied)

    return _finish(event, found, Source.WEBHOOK, await loop.run_in_executor(threads, settle), started)


def _finish(
    event: Event, change: Change | None, source: Source, result: Applied | EventFailed, started: float
) -> Outcome:
    """What an applied event came to: counted, logged, its outcome."""
    assert isinstance(result, Applied)  # _apply raises for an event's own error
    outcome = Outcome(result.status)
    if result.settled_by is not None:
        metrics.TIES.labels(settled_by=result.settled_by.value).inc()
    metrics.EVENTS.labels(type=event.type, outcome=outcome.value).inc()
    if outcome is Outcome.PROCESSED:
        metrics.LAST_PROCESSED.set(event.created)
    log(
        logging.INFO,
        "event handled",
        event_id=event.id,
        type=event.type,
        outcome=outcome.value,
        stripe_customer_id=None if change is None else change.customer,
        source=source,
        latency_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    return outcome


def _queue(engine: Engine, event: Event, settings: Settings) -> Outcome:
    """A delivered thin notification: logged and queued, answered at once; read in the background
    (webhook/thin_queue.py). Without an API key it can never be read: failed, for a replay."""
    if settings.stripe_api_key is None:
        error = thin.ThinNeedsKey(thin.NEEDS_KEY)
        _record_failure(engine, event, error)
        raise ProcessingFailed(event.id, describe(error), shown=thin.NEEDS_KEY)
    try:
        queued = thin_queue.enqueue(engine, event, store.jsonb_text(event.payload))
    except psycopg2.DataError as error:  # a payload jsonb cannot hold: kept as text, failed
        _record_failure(engine, event, error)
        raise ProcessingFailed(event.id, describe(error)) from error
    except (psycopg2.Error, SQLAlchemyError) as error:
        raise unavailable(engine, error, "busy" if database.busy(error) else "connect") from error
    outcome = Outcome.QUEUED if queued else Outcome.DUPLICATE
    metrics.EVENTS.labels(type=event.type, outcome=outcome.value).inc()
    log(logging.INFO, "event handled", event_id=event.id, type=event.type, outcome=outcome.value)
    return outcome


def _thin_change(engine: Engine, event: Event, settings: Settings, shared: budget.Budget) -> Change | None:
    """What Stripe says now of the object a replayed thin event names (webhook/thin.py)."""
    if not thin.wanted(event, settings):
        return None
    try:
        return thin.read(thin.client_for(settings, shared), event, settings)
    except (thin.ThinNeedsKey, thin.Refused) as error:
        _record_failure(engine, event, error)
        raise ProcessingFailed(event.id, describe(error)) from error
    except thin.NotYet as error:
        log(logging.WARNING, "thin event not read", event_id=event.id, type=event.type, error=str(error))
        raise StripeUnavailable(str(error)) from error


def _connection(engine: Engine) -> Any:
    try:
        return engine.raw_connection()
    except (psycopg2.Error, SQLAlchemyError) as connect_error:
        raise unavailable(engine, connect_error, "connect") from connect_error


def _read_instead(change: Change, settings: Settings) -> bool:
    """STRIPE_REFETCH=always: dj-stripe's and Pay's way, the event only says which object to read."""
    return settings.refetch is Refetch.ALWAYS and objects.of(change).refetch_always and not change.links_only


def _to_apply(event: Event, change: Change | None, source: Source, actor: str | None) -> store.EventToApply:
    return store.EventToApply(event.payload, None if change is None else change.as_json(), source, actor)


def _apply(engine: Engine, event: Event, change: Change | None, source: Source, actor: str | None) -> Applied:
    """The event through its process' batches (webhook/batch.py): its outcome, or the answer its error asks for."""
    try:
        return batch.batches(engine).apply(event.id, _to_apply(event, change, source, actor))
    except Exception as error:
        _failed(engine, event, error)


def _failed(engine: Engine, event: Event, error: Exception) -> NoReturn:
    """The answer an error applying the event asks for: an outage (nothing written, Stripe retries)
    or the event recorded as failed."""
    if isinstance(error, batch.Unreachable):
        raise unavailable(engine, error.error, error.kind) from error.error
    if database.busy(error):
        # A held lock or a slow database: nothing was written, and Stripe's retry comes later.
        raise unavailable(engine, error, "busy") from error
    _record_failure(engine, event, error)
    raise ProcessingFailed(event.id, describe(error)) from error


def _record_failure(engine: Engine, event: Event, error: Exception) -> None:
    metrics.EVENTS.labels(type=event.type, outcome="failed").inc()
    if isinstance(error, psycopg2.Error | EventFailed):
        metrics.DB_ERRORS.labels(kind="statement").inc()
    log(logging.ERROR, "event failed", event_id=event.id, type=event.type, error=describe(error))
    connection = _connection(engine)
    try:
        store.record_failure(connection, event, describe(error))
    except psycopg2.Error as record_error:
        # Nothing is written either way, so Stripe's retry is the remedy: answer as an outage.
        database.connection_lost(engine, connection, record_error)
        metrics.DB_ERRORS.labels(kind="record_failure").inc()
        raise DatabaseUnavailable(describe(record_error)) from record_error
    finally:
        connection.close()
