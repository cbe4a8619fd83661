"""The registry (webhook/objects/), walked: every declared object has its events, thin types, a
read and a listing of Stripe that work over HTTP, compared fields whose local rows match what was
read, a sync stamp the SQL opening finds, an audit, and a tombstone for a row that leaves its
table. A newly declared object fails here until it has a sample below."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy import Engine, text

from tests.fake_stripe import FakeStripe
from tests.support import KEY
from tests.test_model import _history
from webhook import objects, objects_store, samples, stripe_api
from webhook.config import Keys
from webhook.objects import HANDLERS, OBJECTS
from webhook.results import Source


def _entitlements(fake: FakeStripe, customer: str) -> str:
    active = {"id": "ent_1", "object": "entitlements.active_entitlement", "feature": "feat_1", "lookup_key": "pro"}
    fake.entitlements[customer] = [active]
    return customer  # a customer's set is one object, named by its customer


def _kept(store: dict[str, dict[str, Any]], found: dict[str, Any]) -> str:
    store[found["id"]] = found
    return str(found["id"])


# How each declared object is put into the fake Stripe, for a customer that is there already: its id.
SAMPLES: dict[str, Callable[[FakeStripe, str], str]] = {
    "customer": lambda fake, customer: customer,
    "subscription": lambda fake, customer: _kept(fake.subscriptions, samples.subscription(customer, status="active")),
    "entitlements": _entitlements,
    "payment_method": lambda fake, customer: _kept(fake.payment_methods, samples.payment_method(customer)),
    "invoice": lambda fake, customer: _kept(fake.invoices, samples.invoice(customer, lines=13)),
}


def test_every_declared_object_is_declared_whole(fake: FakeStripe, stripe_http: str, engine: Engine) -> None:
    assert set(SAMPLES) == set(objects.BY_NAME), "a declared object without a sample in this test"
    client = stripe_api.make_client(_settings(stripe_http))
    reader = stripe_api.reader(client)
    customer = fake.add_customer()["id"]
    for declared in OBJECTS:
        assert declared.events and all(HANDLERS[kind] is handler for kind, handler in declared.events.items())
        thin = [kind + "updated" if kind.endswith(".") else kind for kind in declared.thin]
        assert thin and all(objects.reading_thin(kind) is declared for kind in thin), declared.name
        assert declared.compared, declared.name

        stripe_id = SAMPLES[declared.name](fake, customer)
        read = declared.read(reader, stripe_id, Keys())
        assert (read.object, read.id, read.customer) == (declared.name, stripe_id, customer)
        assert read.as_of is not None  # Stripe's clock
        listing = (
            declared.listing(reader, Keys())
            if declared.scope == "account"
            else declared.listing(reader, customer, Keys())
        )
        assert stripe_id in [change.id for change in listing], declared.name

        assert objects_store.apply_states(engine, [read.as_json()], Source.API, read.as_of) == ["processed"]
        with engine.connect() as connection:
            here = objects_store.local_rows(connection, declared)[stripe_id]
            audited = connection.execute(
                text("SELECT count(*) FROM stripe_customers_audit WHERE object = :object AND stripe_id = :id"),
                {"object": declared.name, "id": stripe_id},
            ).scalar_one()
        assert here == (customer, {label: read.compared_value(label) for label in declared.compared}), declared.name
        assert audited == 1, declared.name
        # The opening finds the row's stamp: an older state is stale, the same one is not.
        older = replace(read, as_of=read.as_of - 1).as_json()
        assert objects_store.apply_states(engine, [older], Source.API, read.as_of) == ["stale"], declared.name

        # A row removed by hand is buried as of the state it held: an older state stays out.
        with engine.begin() as connection:
            removed = f"DELETE FROM public.{declared.table} WHERE {declared.column} = :id"
            connection.execute(text(removed), {"id": stripe_id})
            buried = connection.execute(
                text("SELECT event_created FROM stripe_object_tombstones WHERE object = :object AND stripe_id = :id"),
                {"object": declared.name, "id": stripe_id},
            ).scalar_one()
        assert buried == read.as_of, declared.name
        assert objects_store.apply_states(engine, [older], Source.API, read.as_of) == ["stale"], declared.name


def test_the_model_test_draws_every_declared_object(engine: Engine) -> None:
    rng = random.Random(1)
    drawn = {event["type"] for _ in range(60) for event in _history(rng, engine, 1_700_000_000).events}
    for declared in OBJECTS:
        assert drawn & set(declared.events), f"the model test draws no {declared.name} event"


def _settings(base: str) -> Any:
    from tests.support import settings_for

    return settings_for("postgresql://unused", STRIPE_API_KEY=KEY, STRIPE_API_BASE=base)
