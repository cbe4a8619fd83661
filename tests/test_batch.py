"""Issue 12: the deliveries a worker receives while its statement runs share the next statement
(webhook/batch.py), each still with its own outcome, and one event's failure fails it alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg2
import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.support import customer_row, deliver, event_row, failing_writes
from webhook import batch, database, samples, store
from webhook.config import Settings
from webhook.process import DatabaseUnavailable, ProcessingFailed, process_delivery, process_event
from webhook.results import EventFailed
from webhook.signature import parse_event


def _customer_lock(customer_id: str) -> str:
    return f"pg_advisory_lock(hashtextextended('stripe_customer:{customer_id}', 0))"


@contextlib.contextmanager
def _holding(engine: Engine, customer_id: str) -> Iterator[None]:
    """Another session holds the customer's lock, as a transaction applying an event to it would."""
    with engine.connect() as connection:
        connection.execute(text(f"SELECT {_customer_lock(customer_id)}"))
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock_all()"))


def _in_thread(
    engine: Engine,
    settings: Settings,
    event: dict[str, Any],
    outcomes: dict[str, Any],
    actor: str | None = None,
    body: str | None = None,
) -> threading.Thread:
    """The event (or `body`, its delivered text) processed in a thread of its own, as a worker's
    thread would."""

    def run() -> None:
        try:
            parsed = parse_event(body or json.dumps(event))
            outcomes[event["id"]] = process_event(engine, parsed, settings, actor=actor).value
        except Exception as error:
            outcomes[event["id"]] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as connection:
        return bool(
            connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            ).scalar_one()
        )


def _run_behind_a_held_statement(
    engine: Engine,
    settings: Settings,
    queued: list[dict[str, Any]],
    hold_also: str | None = None,
    actors: dict[str, str] | None = None,
    bodies: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One event whose statement waits for a held customer lock, and `queued` sent while it waits:
    they queue in the process and go together once the lock is released."""
    first = samples.event("customer.created", samples.customer())
    outcomes: dict[str, Any] = {}
    queue = batch.batches(engine)
    with _holding(engine, first["data"]["object"]["id"]):
        threads = [_in_thread(engine, settings, first, outcomes)]
        _wait(lambda: _waiting_on_a_lock(engine), "the first statement waits for the held lock")
        threads += [
            _in_thread(
                engine, settings, event, outcomes, (actors or {}).get(event["id"]), (bodies or {}).get(event["id"])
            )
            for event in queued
        ]
        _wait(lambda: len(queue._queue) == len(queued), "the others queue behind it")
    with _holding(engine, hold_also) if hold_also else contextlib.nullcontext():
        for thread in threads:
            thread.join(15)
    return first, outcomes


def _received_at(engine: Engine, event_id: str) -> Any:
    row = event_row(engine, event_id)
    assert row is not None, event_id
    return row["received_at"]


def test_deliveries_that_arrive_while_a_statement_runs_share_the_next_one(engine: Engine, settings: Settings) -> None:
    queued = [samples.event("customer.created", samples.customer()) for _ in range(3)]
    first, outcomes = _run_behind_a_held_statement(engine, settings, queued)

    assert outcomes == {event["id"]: "processed" for event in [first, *queued]}
    for event in [first, *queued]:
        assert customer_row(engine, event["data"]["object"]["id"]) is not None
    # now() is the transaction's start: one value for the three that shared a statement.
    shared = {_received_at(engine, event["id"]) for event in queued}
    assert len(shared) == 1 and _received_at(engine, first["id"]) not in shared


def test_an_event_that_fails_in_a_shared_statement_fails_alone(engine: Engine, settings: Settings) -> None:
    good = [samples.event("customer.created", samples.customer()) for _ in range(2)]
    bad = samples.event("customer.created", samples.customer())
    locked = samples.event("customer.created", samples.customer())
    bad_id, locked_id = bad["data"]["object"]["id"], locked["data"]["object"]["id"]

    condition = f"NEW.stripe_customer_id = '{bad_id}'"
    with failing_writes(engine, "public.stripe_customers_audit", "AFTER", condition):
        _, outcomes = _run_behind_a_held_statement(engine, settings, [good[0], bad, locked, good[1]], locked_id)

    assert [outcomes[event["id"]] for event in good] == ["processed", "processed"]
    assert all(customer_row(engine, event["data"]["object"]["id"]) is not None for event in good)
    # The fault: answered 500, kept as failed with its error, its customer write undone.
    assert isinstance(outcomes[bad["id"]], ProcessingFailed)
    logged = event_row(engine, bad["id"])
    assert logged is not None and logged["status"] == "failed" and "injected failure" in logged["last_error"]
    assert customer_row(engine, bad_id) is None
    # The lock that stayed held past lock_timeout: answered 503, nothing written, for Stripe to retry.
    assert isinstance(outcomes[locked["id"]], DatabaseUnavailable)
    assert event_row(engine, locked["id"]) is None and customer_row(engine, locked_id) is None


@pytest.mark.parametrize("poison", ['"\\ud800"', "1e1000000"])
def test_a_payload_jsonb_cannot_hold_fails_alone(engine: Engine, settings: Settings, poison: str) -> None:
    good = samples.event("customer.created", samples.customer())
    bad = samples.event("customer.updated", samples.customer())
    body = json.dumps(bad).replace('"Jenny Rosen"', poison)
    assert body != json.dumps(bad)
    first, outcomes = _run_behind_a_held_statement(engine, settings, [good, bad], bodies={bad["id"]: body})

    assert outcomes[good["id"]] == "processed" and outcomes[first["id"]] == "processed"
    assert isinstance(outcomes[bad["id"]], ProcessingFailed)
    logged = event_row(engine, bad["id"])
    assert logged is not None and logged["status"] == "failed"


def test_a_statement_that_fails_as_a_whole_is_retried_event_by_event(
    engine: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # stripe_apply_batch catches each event's error itself; should a statement still fail as a
    # whole, the events are sent alone rather than all answered 500.
    real = store.apply_events

    def refusing_shared(connection: Any, events: Any, settings: str) -> list[str]:
        if len(events) > 1:
            raise psycopg2.ProgrammingError("a statement that fails as a whole")
        return real(connection, events, settings)

    monkeypatch.setattr(store, "apply_events", refusing_shared)
    queued = [samples.event("customer.created", samples.customer()) for _ in range(3)]
    first, outcomes = _run_behind_a_held_statement(engine, settings, queued)

    assert outcomes == {event["id"]: "processed" for event in [first, *queued]}
    assert len({_received_at(engine, event["id"]) for event in queued}) == 3


def test_a_person_acting_in_a_shared_statement_is_named_for_their_event_only(
    engine: Engine, settings: Settings
) -> None:
    # A statement applies its events in customer order: the acting one goes first, so a name that
    # stayed set would show on the two after it.
    queued = [
        samples.event("customer.created", samples.customer(f"cus_{n}{samples.stripe_id('x')[2:]}")) for n in "abc"
    ]
    acting = queued[0]["id"]
    _, outcomes = _run_behind_a_held_statement(engine, settings, queued, actors={acting: "support:alice"})

    assert set(outcomes.values()) == {"processed"}
    with engine.connect() as connection:
        current_user = connection.execute(text("SELECT current_user")).scalar_one()
        named = dict(connection.execute(text("SELECT event_id, changed_by FROM stripe_customers_audit")).all())
    assert named[acting] == "support:alice"
    assert [named[event["id"]] for event in queued if event["id"] != acting] == [current_user, current_user]
    assert len({_received_at(engine, event["id"]) for event in queued}) == 1


def test_a_held_lock_fails_only_the_events_that_wait_for_it(database_url: str, engine: Engine) -> None:
    """16 concurrent deliveries to one worker, 6 of them for customers whose lock another session
    holds for 20 s: those 6 fail (503, Stripe retries), and the 10 others are applied and answered
    while the lock is still held, however the worker grouped them into statements."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.server import gunicorn, post_event

    locked = [samples.customer() for _ in range(6)]
    free = [samples.customer() for _ in range(10)]
    with gunicorn(database_url, workers=1) as (port, _), engine.connect() as holder:
        holder.execute(text("SELECT " + ", ".join(_customer_lock(customer["id"]) for customer in locked)))
        release_at = time.monotonic() + 20
        try:
            with ThreadPoolExecutor(max_workers=16) as pool:
                answers = list(
                    pool.map(
                        lambda customer: (
                            post_event(port, samples.event("customer.created", customer))[0],
                            time.monotonic(),
                        ),
                        locked + free,
                    )
                )
        finally:
            holder.execute(text("SELECT pg_advisory_unlock_all()"))
    assert [status for status, _ in answers] == [503] * 6 + [200] * 10
    assert all(answered < release_at for _, answered in answers)
    assert all(customer_row(engine, customer["id"]) is not None for customer in free)
    assert all(customer_row(engine, customer["id"]) is None for customer in locked)


def test_deliveries_read_in_one_turn_of_the_loop_share_a_statement(engine: Engine, settings: Settings) -> None:
    """The server's path (process_delivery from the event loop): deliveries that the loop reads
    in one turn, as a burst from senders in step arrives, go in one statement together."""
    events = [samples.event("customer.created", samples.customer()) for _ in range(4)]

    async def burst() -> list[str]:
        deliveries = [process_delivery(engine, parse_event(json.dumps(event)), settings, threads) for event in events]
        return [outcome.value for outcome in await asyncio.gather(*deliveries)]

    with ThreadPoolExecutor(2) as threads:
        assert asyncio.run(burst()) == ["processed"] * 4
    assert len({_received_at(engine, event["id"]) for event in events}) == 1  # one transaction's now()


@contextlib.contextmanager
def _silent_database() -> Iterator[Engine]:
    """An engine whose server accepts connections and never speaks."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.extend(iter(lambda: silent.accept()[0], None)), daemon=True).start()
    try:
        yield database.make_engine(f"postgresql://u:p@127.0.0.1:{silent.getsockname()[1]}/db", pool_size=5)
    finally:
        silent.close()
        for connection in accepted:
            connection.close()


@pytest.mark.reliability  # slow (a long wait by design): beside the soak, not in the default run
def test_a_database_that_never_answers_costs_the_loop_one_connect_timeout(settings: Settings) -> None:
    """As below, for the deliveries the event loop holds: those queued in the loop behind the
    statement that is connecting get their 503 with it."""

    async def deliver() -> tuple[type[BaseException] | None, float]:
        started = time.monotonic()
        event = parse_event(json.dumps(samples.event("customer.created", samples.customer())))
        try:
            await process_delivery(engine, event, settings, threads)
        except DatabaseUnavailable as error:
            return type(error), time.monotonic() - started
        return None, time.monotonic() - started

    async def deliveries() -> list[tuple[type[BaseException] | None, float]]:
        first = asyncio.ensure_future(deliver())
        await asyncio.sleep(0.5)  # the others queue behind the first one's connect
        return await asyncio.gather(first, *(deliver() for _ in range(7)))

    with _silent_database() as engine, ThreadPoolExecutor(8) as threads:
        answers = asyncio.run(deliveries())
    assert [kind for kind, _ in answers] == [DatabaseUnavailable] * 8
    assert max(took for _, took in answers) < 8  # one connect timeout (5 s), not two in turn


@pytest.mark.reliability  # slow (a long wait by design): beside the soak, not in the default run
def test_a_database_that_never_answers_costs_one_connect_timeout(settings: Settings) -> None:
    """A server that accepts connections and never speaks: every delivery queued behind the one
    connecting gets its 503 with it, not after a connect timeout of its own in turn."""

    def deliver(_: int) -> tuple[type[BaseException] | None, float]:
        started = time.monotonic()
        event = parse_event(json.dumps(samples.event("customer.created", samples.customer())))
        try:
            process_event(engine, event, settings)
        except DatabaseUnavailable as error:
            return type(error), time.monotonic() - started
        return None, time.monotonic() - started

    with _silent_database() as engine, ThreadPoolExecutor(max_workers=8) as pool:
        first = pool.submit(deliver, 0)
        time.sleep(0.5)  # the others queue behind the first one's connect
        answers = [first.result(), *pool.map(deliver, range(7))]
    print(f"\n8 deliveries against a silent database: slowest answer {max(took for _, took in answers):.1f} s")
    assert [kind for kind, _ in answers] == [DatabaseUnavailable] * 8
    assert max(took for _, took in answers) < 8  # one connect timeout (5 s), not two or more in turn


@pytest.mark.parametrize(
    ("sqlstate", "answered", "statements"),
    [("40P01", 200, 2), ("55P03", 503, 1)],
    ids=["a deadlock's victim is sent again at once", "a lock timeout is answered 503"],
)
def test_an_event_that_lost_to_another_statement_is_sent_again(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch, sqlstate: str, answered: int, statements: int
) -> None:
    real = store.apply_events
    sent: list[int] = []

    def losing_once(connection: Any, events: Any, settings: str) -> list[Any]:
        sent.append(len(events))
        if len(sent) == 1:
            return [EventFailed(sqlstate, "lost to another transaction") for _ in events]
        return real(connection, events, settings)

    monkeypatch.setattr(store, "apply_events", losing_once)
    answer = deliver(client, samples.event("customer.created", samples.customer()))
    assert answer.status_code == answered, answer.get_data(as_text=True)
    assert sent == [1] * statements
