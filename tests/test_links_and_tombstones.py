"""Links that move or go, tombstones, checkouts, verify --fix's refusals and replays of stale events:
what must never be wrong or lost, tried from the outside (signed deliveries to gunicorn, CLI
subprocesses, the fake Stripe over HTTP)."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.fake_stripe import FakeStripe
from tests.server import gunicorn, post_event
from tests.support import (
    SECRET,
    add_user,
    cli,
    count,
    customer_row,
    event_row,
    now,
    settings_for,
    sign,
    unlinked_by_hand_then_verified,
)
from webhook import samples
from webhook.config import Keys
from webhook.customers import ensure_customer
from webhook.stripe_api import make_client

T = now() - 3600


@pytest.fixture
def port(server: int, engine: Engine) -> int:
    return server


def _sync(engine: Engine, customer_id: str) -> dict[str, Any]:
    row = customer_row(engine, customer_id)
    assert row is not None
    return dict(row["customer_metadata"]["sync"])


def _post_raw(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        header = sign(body.decode("utf-8", "surrogatepass"))
        connection.request("POST", "/webhooks/stripe", body, {"Stripe-Signature": header})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


# 1. verify --fix with a key for another account or the other mode


def test_verify_fix_refuses_to_empty_the_table(port: int, engine: Engine, database_url: str) -> None:
    customers = [samples.customer(created=T) for _ in range(5)]
    for customer in customers:
        assert post_event(port, samples.event("customer.created", customer, created=T))[1]["status"] == "processed"
    other_account = FakeStripe()  # knows none of them, as a key for another account or mode would
    with other_account.serving() as base:
        env = {"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": SECRET, "STRIPE_API_BASE": base}
        refused = cli("verify", "--fix", **env, STRIPE_API_KEY="sk_test_fake")
        assert refused.returncode == 1 and "would delete 5 of 5 rows" in refused.stderr, refused.stderr
        assert count(engine, "SELECT count(*) FROM stripe_customers") == 5

        other_account.api_key = "sk_live_fake"  # a live key on this test-mode database
        wrong_mode = cli("verify", "--fix", "--allow-mass-delete", **env, STRIPE_API_KEY="sk_live_fake")
        assert wrong_mode.returncode == 1 and "live-mode key" in wrong_mode.stderr, wrong_mode.stderr
        assert count(engine, "SELECT count(*) FROM stripe_customers") == 5

        other_account.api_key = "sk_test_fake"
        for customer in customers[1:]:
            other_account.customers[customer["id"]] = customer
        one_gone = cli("verify", "--fix", **env, STRIPE_API_KEY="sk_test_fake")  # 1 of 5: plausible
        assert one_gone.returncode == 0, one_gone.stderr
        assert count(engine, "SELECT count(*) FROM stripe_customers") == 4

        other_account.customers.clear()
        forced = cli("verify", "--fix", "--allow-mass-delete", **env, STRIPE_API_KEY="sk_test_fake")
        assert forced.returncode == 0, forced.stderr
        assert count(engine, "SELECT count(*) FROM stripe_customers") == 0


# 2. and 3. checkouts


def test_a_checkout_arriving_first_never_makes_its_customers_events_stale(port: int, engine: Engine) -> None:
    user_id = add_user(engine)
    customer = samples.customer(created=T, metadata={"plan": "pro"})
    checkout = samples.event(
        "checkout.session.completed",
        samples.checkout_session(customer["id"], user_id, email="buyer@example.com", name="Buyer"),
        created=T + 2,
    )
    created = samples.event("customer.created", customer, created=T)
    updated = samples.event(
        "customer.updated",
        {**customer, "invoice_settings": {**customer["invoice_settings"], "default_payment_method": "pm_card"}},
        created=T + 1,
    )

    assert post_event(port, checkout)[1]["status"] == "processed"
    assert str(customer_row(engine, customer["id"])["user_id"]) == user_id  # type: ignore[index]
    assert [post_event(port, event)[1]["status"] for event in (created, updated)] == ["processed", "processed"]

    row = customer_row(engine, customer["id"])
    assert row is not None and str(row["user_id"]) == user_id
    assert row["default_payment_method"] == "pm_card" and row["customer_metadata"]["stripe"] == {"plan": "pro"}
    assert _sync(engine, customer["id"])["event_created"] == T + 1


def test_a_checkout_that_cannot_link_says_so(port: int, engine: Engine) -> None:
    first_user, second_user = add_user(engine), add_user(engine)
    customer = samples.customer(created=T, metadata={"user_id": first_user})
    assert post_event(port, samples.event("customer.created", customer, created=T))[1]["status"] == "processed"
    checkout = samples.event(
        "checkout.session.completed",
        samples.checkout_session(customer["id"], second_user, email=None, name=None),
        created=T + 5,
    )

    assert post_event(port, checkout)[1]["status"] == "processed"

    row = customer_row(engine, customer["id"])
    assert row is not None and str(row["user_id"]) == first_user
    note = _sync(engine, customer["id"])["note"]
    assert second_user in note and "already linked to another user" in note and first_user not in note
    logged = event_row(engine, checkout["id"])
    assert logged is not None and logged["last_error"] == note


# 4. and 5. a user is handed on, and every way out leaves a tombstone


def _linked_and_waiting(port: int, engine: Engine) -> tuple[str, dict[str, Any], dict[str, Any]]:
    user_id = add_user(engine)
    linked = samples.customer(created=T, metadata={"user_id": user_id})
    waiting = samples.customer(created=T, metadata={"user_id": user_id})
    assert post_event(port, samples.event("customer.created", linked, created=T))[1]["status"] == "processed"
    assert post_event(port, samples.event("customer.created", waiting, created=T + 1))[1]["status"] == "processed"
    assert customer_row(engine, waiting["id"])["user_id"] is None  # type: ignore[index]
    return user_id, linked, waiting


@pytest.mark.parametrize("how", ["customer.deleted", "by hand"])
def test_a_user_is_handed_to_the_customer_that_names_them(how: str, port: int, engine: Engine) -> None:
    user_id, linked, waiting = _linked_and_waiting(port, engine)

    if how == "by hand":
        with engine.connect() as connection:
            connection.execute(
                text("DELETE FROM stripe_customers WHERE stripe_customer_id = :id"), {"id": linked["id"]}
            )
    else:
        assert post_event(port, samples.event("customer.deleted", linked, created=T + 10))[1]["status"] == "processed"

    row = customer_row(engine, waiting["id"])
    assert row is not None and str(row["user_id"]) == user_id
    sync = _sync(engine, waiting["id"])
    assert sync["status"] == "synced" and linked["id"] in sync["note"]
    # The gone customer's older events stay out.
    stale = samples.event("customer.updated", linked, created=T)
    assert post_event(port, stale)[1]["status"] == "stale"


def test_a_link_that_moves_hands_the_user_it_left_on(port: int, engine: Engine) -> None:
    user_id, linked, waiting = _linked_and_waiting(port, engine)
    other_user = add_user(engine)
    assert "already linked" in _sync(engine, waiting["id"])["note"]

    moved = {**linked, "metadata": {"user_id": other_user}}
    assert post_event(port, samples.event("customer.updated", moved, created=T + 10))[1]["status"] == "processed"

    assert str(customer_row(engine, linked["id"])["user_id"]) == other_user  # type: ignore[index]
    assert str(customer_row(engine, waiting["id"])["user_id"]) == user_id  # type: ignore[index]
    sync = _sync(engine, waiting["id"])
    assert sync["status"] == "synced" and linked["id"] in sync["note"] and "moved to another user" in sync["note"]
    assert count(engine, "SELECT count(*) FROM stripe_customer_claims") == 0


def test_verify_finds_and_fix_mends_a_user_left_unlinked(port: int, engine: Engine, database_url: str) -> None:
    user_id, linked, waiting = _linked_and_waiting(port, engine)
    unlinked_by_hand_then_verified(engine, database_url, "user", linked, waiting)
    assert str(customer_row(engine, waiting["id"])["user_id"]) == user_id  # type: ignore[index]
    assert "reconciliation" in _sync(engine, waiting["id"])["note"]


def test_verify_fix_hands_the_user_on_and_leaves_a_tombstone(port: int, engine: Engine, database_url: str) -> None:
    user_id, linked, waiting = _linked_and_waiting(port, engine)
    others = [samples.customer(created=T) for _ in range(10)]
    for customer in others:
        assert post_event(port, samples.event("customer.created", customer, created=T))[1]["status"] == "processed"
    stripe = FakeStripe()
    for customer in [waiting, *others]:
        stripe.customers[customer["id"]] = customer
    stripe.deleted.add(linked["id"])
    with stripe.serving() as base:
        env = {"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": SECRET, "STRIPE_API_BASE": base}
        fixed = cli("verify", "--fix", **env, STRIPE_API_KEY="sk_test_fake")
    assert fixed.returncode == 0, fixed.stderr
    assert customer_row(engine, linked["id"]) is None
    assert str(customer_row(engine, waiting["id"])["user_id"]) == user_id  # type: ignore[index]
    assert post_event(port, samples.event("customer.updated", linked, created=T + 5))[1]["status"] == "stale"


def test_the_auth_users_cascade_leaves_a_tombstone(port: int, engine: Engine) -> None:
    user_id = add_user(engine)
    customer = samples.customer(created=T, metadata={"user_id": user_id})
    assert post_event(port, samples.event("customer.created", customer, created=T + 5))[1]["status"] == "processed"
    with engine.connect() as connection:
        connection.execute(text("DELETE FROM auth.users WHERE id = :id"), {"id": user_id})
    assert customer_row(engine, customer["id"]) is None

    assert post_event(port, samples.event("customer.updated", customer, created=T + 4))[1]["status"] == "stale"
    assert customer_row(engine, customer["id"]) is None
    newer = samples.event("customer.updated", {**customer, "name": "Still a customer"}, created=T + 6)
    assert post_event(port, newer)[1]["status"] == "processed"
    assert _sync(engine, customer["id"])["status"] == "unlinked"


# 6. ignored and stale events run again


def test_replay_reruns_ignored_and_stale_events(database_url: str, engine: Engine) -> None:
    customer = samples.customer(created=T)
    with gunicorn(database_url, workers=1, STRIPE_EXPECT_LIVEMODE="true") as (port, _):
        ignored = samples.event("customer.created", customer, created=T)  # a test-mode event
        assert post_event(port, ignored)[1]["status"] == "ignored"
    env = {"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": SECRET}

    replayed = cli("replay", "--event", ignored["id"], **env)
    assert (replayed.returncode, replayed.stdout.strip()) == (0, "replayed 1: 1 processed"), replayed.stderr
    assert customer_row(engine, customer["id"]) is not None

    with engine.connect() as connection:  # a row removed by hand: the stale event may now apply
        connection.execute(
            text("UPDATE stripe_webhook_events SET status = 'stale' WHERE id = :id"), {"id": ignored["id"]}
        )
    assert cli("replay", "--status", "stale", **env).stdout.strip() == "replayed 1: 1 processed"
    assert cli("replay", "--event", ignored["id"], **env).stdout.strip() == "replayed 1: 1 duplicate"


# 7. ensure-customer never returns a deleted customer


def test_ensure_customer_replaces_a_customer_deleted_since(engine: Engine, database_url: str) -> None:
    fake = FakeStripe()
    user_id = add_user(engine, email="again@example.com")
    client = make_client(settings_for(database_url, STRIPE_API_KEY="sk_test_fake"))
    with fake.mocked():
        first = ensure_customer(engine, client, user_id, Keys())
        fake.delete_customer(first)
        with engine.connect() as connection:  # its customer.deleted webhook has removed the row
            connection.execute(text("DELETE FROM stripe_customers WHERE stripe_customer_id = :id"), {"id": first})

        second = ensure_customer(engine, client, user_id, Keys())

    assert second != first and second in fake.customers
    assert str(customer_row(engine, second)["user_id"]) == user_id  # type: ignore[index]


# 8. signed events Postgres cannot store, and customer ids that are not customer ids


def test_unstorable_and_malformed_events_get_a_final_answer(port: int, engine: Engine) -> None:
    customer = samples.customer(created=T)
    with_bom = b"\xef\xbb\xbf" + json.dumps(samples.event("customer.created", customer, created=T)).encode()
    assert _post_raw(port, with_bom) == (200, {"event_id": json.loads(with_bom[3:])["id"], "status": "processed"})

    for poison in ('"\\ud800"', "1e1000000"):
        event = samples.event("customer.updated", customer, created=T + 1)
        body = json.dumps(event).replace('"Jenny Rosen"', poison).encode()
        status, answer = _post_raw(port, body)
        assert status == 500 and answer["event_id"] == event["id"], (poison, status, answer)
        logged = event_row(engine, event["id"])
        assert logged is not None and logged["status"] == "failed"

    not_a_customer = samples.event("customer.updated", {**customer, "id": "acct_123"}, created=T + 2)
    status, answer = post_event(port, not_a_customer)
    assert status == 400 and "cus_" in answer["error"]
    assert event_row(engine, not_a_customer["id"]) is None
