"""The ordering rules (docs/reference.md, "Event semantics"), in one place: an older event is stale; a deletion
keeps older events out (its tombstone never moves back); shuffled and duplicated deliveries end in
the newest state; and ties, two events of one customer in one second, settled by the ladder in both
delivery orders and duplicated, through a real gunicorn with two workers, the fake Stripe over HTTP
(STRIPE_API_BASE) holding the truth for the third rung."""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.fake_stripe import FakeStripe
from tests.server import gunicorn, post_event
from tests.support import audit_steps_backwards, count, customer_row, deliver, event_row, now
from tests.test_events import sync_of
from webhook import samples

T = now() - 3600  # the one second both events carry


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeStripe]:
    yield FakeStripe()


@pytest.fixture
def port(keyed_server: int, fake: FakeStripe, engine: Engine) -> int:
    fake.customers.clear()
    fake.deleted.clear()
    fake.failures.clear()
    fake.clock, fake.delay = None, 0.0
    return keyed_server


def _updated(customer: dict[str, Any], previous: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return samples.event("customer.updated", {**customer, **fields}, created=T, previous_attributes=previous)


@dataclass
class Case:
    """Two same-second events; `expect` checks the row (None: no row) after both, in either order."""

    name: str
    events: Callable[[dict[str, Any], FakeStripe], tuple[dict[str, Any], dict[str, Any]]]
    expect: Callable[[dict[str, Any] | None, list[str]], None]
    settled_by: str


def _name(expected: str) -> Callable[[dict[str, Any] | None, list[str]], None]:
    def check(row: dict[str, Any] | None, order: list[str]) -> None:
        assert row is not None and row["customer_name"] == expected, (row, order)

    return check


def _gone(row: dict[str, Any] | None, order: list[str]) -> None:
    assert row is None


def _last_delivered(row: dict[str, Any] | None, order: list[str]) -> None:
    assert row is not None and row["customer_name"] == order[-1]
    assert "tie not settled" in row["customer_metadata"]["sync"]["note"]


CASES = [
    Case(
        "created and updated: the update is newer",
        lambda c, _: (
            samples.event("customer.created", {**c, "name": "first"}, created=T),
            _updated(c, {"name": "first"}, name="second"),
        ),
        _name("second"),
        "type",
    ),
    Case(
        "updated and deleted: the deletion is newest",
        lambda c, _: (
            _updated(c, {"name": "Jenny Rosen"}, name="second"),
            samples.event("customer.deleted", c, created=T),
        ),
        _gone,
        "type",
    ),
    Case(
        "two updates: previous_attributes chain them",
        lambda c, _: (_updated(c, {"name": "zero"}, name="first"), _updated(c, {"name": "first"}, name="second")),
        _name("second"),
        "previous_attributes",
    ),
    Case(
        "two updates nothing orders: Stripe's read decides",
        lambda c, fake: (
            fake.customers.update({c["id"]: {**c, "name": "truth"}}) or _updated(c, name="first"),
            _updated(c, name="second"),
        ),
        _name("truth"),
        "stripe",
    ),
    Case(
        "two updates Stripe cannot settle (no such customer there): the last delivered wins, noted",
        lambda c, _: (_updated(c, name="first"), _updated(c, name="second")),
        _last_delivered,
        "unsettled",
    ),
]


def _ties(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("stripe_webhook_ties_total{"):
            found[line.split('settled_by="')[1].split('"')[0]] = float(line.split()[-1])
    return found


@pytest.mark.parametrize("reverse", [False, True], ids=["in order", "reversed"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_tie_ladder(case: Case, reverse: bool, port: int, fake: FakeStripe, engine: Engine) -> None:
    customer = samples.customer(created=T)
    pair = case.events(customer, fake)
    order = list(reversed(pair)) if reverse else list(pair)
    before = _ties(port).get(case.settled_by, 0)

    answers = [post_event(port, event) for event in order]
    assert [status for status, _ in answers] == [200, 200]
    delivered = [event["data"]["object"]["name"] for event in order]
    row = customer_row(engine, customer["id"])
    case.expect(row, delivered)

    # Duplicates of both change nothing, whichever comes again first.
    again = [post_event(port, event) for event in reversed(order)]
    assert [answer["status"] for _, answer in again] == ["duplicate", "duplicate"]
    assert customer_row(engine, customer["id"]) == row
    assert all(event_row(engine, event["id"])["attempts"] == 1 for event in order)  # type: ignore[index]
    if not (case.expect is _gone and reverse):
        # A deletion delivered first leaves a tombstone, and the update after it is plainly stale.
        assert _ties(port).get(case.settled_by, 0) >= before + 1


def test_stripe_read_is_stamped_with_stripes_clock(port: int, fake: FakeStripe, engine: Engine) -> None:
    customer = samples.customer(created=T)
    fake.customers[customer["id"]] = {**customer, "name": "truth"}
    fake.clock = T + 30  # Stripe's Date header: the moment of the read
    first, second = _updated(customer, name="first"), _updated(customer, name="second")
    assert post_event(port, first)[1]["status"] == "processed"
    assert post_event(port, second)[1]["status"] == "processed"

    row = customer_row(engine, customer["id"])
    assert row is not None and row["customer_name"] == "truth"
    assert row["customer_metadata"]["sync"]["source"] == "api"
    assert row["customer_metadata"]["sync"]["event_created"] == T + 30
    # An event from before the read is stale now; one after it applies.
    late = samples.event("customer.updated", {**customer, "name": "older"}, created=T + 20)
    assert post_event(port, late)[1]["status"] == "stale"
    newer = samples.event("customer.updated", {**customer, "name": "newer"}, created=T + 31)
    assert post_event(port, newer)[1]["status"] == "processed"


def test_a_tie_stripe_settles_as_deleted_deletes_with_stripes_clock(
    port: int, fake: FakeStripe, engine: Engine
) -> None:
    customer = samples.customer(created=T)
    fake.deleted.add(customer["id"])
    fake.clock = T + 30
    first, second = _updated(customer, name="first"), _updated(customer, name="second")
    assert post_event(port, first)[1]["status"] == "processed"
    assert post_event(port, second)[1]["status"] == "processed"  # the tie: Stripe says it is gone
    assert customer_row(engine, customer["id"]) is None
    # The tombstone carries Stripe's clock: an event from before the read does not bring it back.
    late = samples.event("customer.updated", {**customer, "name": "older"}, created=T + 20)
    assert post_event(port, late)[1]["status"] == "stale"
    assert customer_row(engine, customer["id"]) is None


def test_a_slow_or_failing_stripe_falls_back_within_seconds(port: int, fake: FakeStripe, engine: Engine) -> None:
    customer = samples.customer(created=T)
    fake.customers[customer["id"]] = {**customer, "name": "truth"}
    assert post_event(port, _updated(customer, name="first"))[1]["status"] == "processed"

    fake.delay = 20  # Stripe never answers in time
    started = time.monotonic()
    status, answer = post_event(port, _updated(customer, name="second"), timeout=30)
    slow = time.monotonic() - started
    fake.delay = 0
    assert status == 200 and answer["status"] == "processed" and slow < 5, slow
    assert customer_row(engine, customer["id"])["customer_name"] == "second"  # type: ignore[index]

    fake.failures.extend([(500, {"error": {"type": "api_error", "message": "boom"}})] * 10)
    status, answer = post_event(port, _updated(customer, name="third"))
    fake.failures.clear()
    assert status == 200 and answer["status"] == "processed"
    row = customer_row(engine, customer["id"])
    assert row is not None and row["customer_name"] == "third"
    assert "tie not settled" in row["customer_metadata"]["sync"]["note"]


def test_refetch_always_applies_stripes_state_and_survives_429(
    fake: FakeStripe, database_url: str, engine: Engine
) -> None:
    customer = samples.customer(created=T)
    fake.customers[customer["id"]] = {**customer, "name": "truth"}
    env = {"STRIPE_API_KEY": "sk_test_fake", "STRIPE_REFETCH": "always"}
    with fake.serving() as base, gunicorn(database_url, workers=2, STRIPE_API_BASE=base, **env) as (port, _):
        assert post_event(port, _updated(customer, name="what the event says"))[1]["status"] == "processed"
        row = customer_row(engine, customer["id"])
        assert row is not None and row["customer_name"] == "truth"
        assert row["customer_metadata"]["sync"]["source"] == "api"

        # Rate limited once: tried again within the read's budget, and Stripe's state applies.
        fake.customers[customer["id"]]["name"] = "truth after a 429"
        fake.failures.append((429, {"error": {"type": "rate_limit_error", "message": "slow down"}}))
        again = samples.event("customer.updated", {**customer, "name": "not this"}, created=now() + 2)
        assert post_event(port, again)[1]["status"] == "processed"
        assert customer_row(engine, customer["id"])["customer_name"] == "truth after a 429"  # type: ignore[index]
        assert not fake.failures  # the 429 was answered, then the retry

        # Rate limited for longer than a delivery may wait: the event's own state, not a lost event.
        fake.failures.extend([(429, {"error": {"type": "rate_limit_error", "message": "slow down"}})] * 10)
        later = samples.event("customer.updated", {**customer, "name": "from the event"}, created=now() + 5)
        assert post_event(port, later)[1]["status"] == "processed"
        fake.failures.clear()
    assert customer_row(engine, customer["id"])["customer_name"] == "from the event"  # type: ignore[index]


def test_older_event_is_stale(client: FlaskClient, engine: Engine) -> None:
    customer = samples.customer(email="new@example.com")
    newer = samples.event("customer.updated", customer, created=now())
    older = samples.event("customer.updated", {**customer, "email": "old@example.com"}, created=now() - 60)

    assert deliver(client, newer).get_json()["status"] == "processed"
    answer = deliver(client, older)

    assert answer.get_json() == {"event_id": older["id"], "status": "stale"}
    assert customer_row(engine, customer["id"])["customer_email"] == "new@example.com"  # type: ignore[index]
    assert event_row(engine, older["id"])["status"] == "stale"  # type: ignore[index]
    assert deliver(client, older).get_json()["status"] == "duplicate"


def test_deletion_removes_the_row_and_stale_updates_do_not_revive_it(client: FlaskClient, engine: Engine) -> None:
    customer = samples.customer(email="gone@example.com")
    t = now() - 100
    assert deliver(client, samples.event("customer.created", customer, created=t)).get_json()["status"] == "processed"
    deletion = samples.event("customer.deleted", customer, created=t + 10)

    assert deliver(client, deletion).get_json()["status"] == "processed"
    assert customer_row(engine, customer["id"]) is None
    for created in (t + 5, t + 10):  # delivered late: older than, or as old as, the deletion
        late = samples.event("customer.updated", {**customer, "name": "Zombie"}, created=created)
        assert deliver(client, late).get_json()["status"] == "stale"
    assert customer_row(engine, customer["id"]) is None

    with engine.connect() as connection:
        audit = connection.execute(
            text("SELECT operation, old_row, event_id FROM stripe_customers_audit ORDER BY id")
        ).all()
    assert [entry.operation for entry in audit] == ["INSERT", "DELETE"]
    assert audit[1].old_row["customer_email"] == "gone@example.com" and audit[1].event_id == deletion["id"]


def test_deleting_an_unknown_customer_is_processed(client: FlaskClient, engine: Engine) -> None:
    customer = samples.customer()
    assert (
        deliver(client, samples.event("customer.deleted", customer, created=now())).get_json()["status"] == "processed"
    )
    created_late = samples.event("customer.created", customer, created=now() - 30)

    assert deliver(client, created_late).get_json()["status"] == "stale"
    assert customer_row(engine, customer["id"]) is None


def test_shuffled_updates_end_in_the_newest_state(client: FlaskClient, engine: Engine) -> None:
    customer = samples.customer()
    base = now() - 1000
    events = [
        samples.event("customer.updated", {**customer, "name": f"version {i}"}, created=base + i) for i in range(30)
    ]
    shuffled = events[:]
    random.Random(7).shuffle(shuffled)

    outcomes = [deliver(client, event).get_json()["status"] for event in shuffled]

    assert set(outcomes) <= {"processed", "stale"} and "stale" in outcomes
    row = customer_row(engine, customer["id"])
    assert row is not None and row["customer_name"] == "version 29"
    assert sync_of(row)["event_id"] == events[-1]["id"]
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == 30


def test_concurrent_duplicated_deliveries_end_in_the_newest_state(client: FlaskClient, engine: Engine) -> None:
    customers = [samples.customer() for _ in range(5)]
    base = now() - 1000
    events = [
        samples.event("customer.updated", {**customer, "name": f"{customer['id']} v{i}"}, created=base + i)
        for customer in customers
        for i in range(12)
    ]
    deliveries = events * 2  # Stripe retries: every event arrives twice
    random.Random(11).shuffle(deliveries)

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda event: deliver(client, event).status_code, deliveries))

    assert set(statuses) == {200}
    for customer in customers:
        assert customer_row(engine, customer["id"])["customer_name"] == f"{customer['id']} v11"  # type: ignore[index]
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events") == len(events)
    assert count(engine, "SELECT count(*) FROM stripe_webhook_events WHERE status NOT IN ('processed', 'stale')") == 0
    # The audit, in commit order, never moves a customer backwards.
    assert audit_steps_backwards(engine) == 0


def test_a_tombstone_never_moves_back_in_time(client: Any, engine: Engine) -> None:
    """An older deletion delivered later, or a row gone by hand, never lowers the time a deletion
    keeps older events out by: a customer's tombstone and a payment method's alike."""

    def tombstones() -> tuple[int, int]:
        found = "SELECT event_created FROM stripe_object_tombstones WHERE (object = 'customer') = :customer"
        with engine.connect() as connection:
            return (
                connection.execute(text(found), {"customer": True}).scalar_one(),
                connection.execute(text(found), {"customer": False}).scalar_one(),
            )

    def status(event: dict[str, Any]) -> str:
        answer = deliver(client, event)
        assert answer.status_code == 200, answer.get_data(as_text=True)
        return str(answer.get_json()["status"])

    customer = samples.customer(created=T)
    method = samples.payment_method(customer["id"])
    assert status(samples.event("customer.created", customer, created=T)) == "processed"
    assert status(samples.event("payment_method.attached", method, created=T)) == "processed"
    assert status(samples.event("customer.deleted", customer, created=T + 10)) == "processed"
    assert status(samples.event("payment_method.detached", {**method, "customer": None}, created=T + 10)) == "processed"
    assert tombstones() == (T + 10, T + 10)
    assert status(samples.event("customer.deleted", customer, created=T + 5)) == "stale"
    detached_earlier = samples.event("payment_method.detached", {**method, "customer": None}, created=T + 5)
    assert status(detached_earlier) == "stale"
    assert tombstones() == (T + 10, T + 10)
    # Back, newer, then gone by hand: the tombstone moves forward to what the row reflected ...
    assert status(samples.event("customer.created", customer, created=T + 20)) == "processed"
    with engine.connect() as connection:
        connection.execute(text("DELETE FROM stripe_customers WHERE stripe_customer_id = :c"), {"c": customer["id"]})
    assert tombstones()[0] == T + 20
    # ... and an old deletion after that leaves it there.
    assert status(samples.event("customer.deleted", customer, created=T + 15)) == "stale"
    assert tombstones()[0] == T + 20
