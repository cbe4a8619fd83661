"""Subscriptions, entitlements and access: each object under the same ordering rules as customers
(stale, same-second ties in both delivery orders, tombstones), both API-version shapes, entitlement
sets replaced and completed from Stripe, and stripe_has_access / stripe_user_billing as the app's
roles see them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.fake_stripe import FakeStripe
from tests.support import add_user, count, deliver, event_row, now, read_waiting
from tests.test_rls import acting_as
from webhook import samples
from webhook.config import Settings

T = now() - 3600


def _subscription(engine: Engine, subscription_id: str) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT * FROM stripe_subscriptions WHERE stripe_subscription_id = :id"), {"id": subscription_id}
        ).first()
    return None if row is None else dict(row._mapping)


def _entitlements(engine: Engine, customer_id: str) -> list[str]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                text("SELECT lookup_key FROM stripe_entitlements WHERE stripe_customer_id = :c ORDER BY 1"),
                {"c": customer_id},
            ).scalars()
        )


def _status(client: FlaskClient, event: dict[str, Any]) -> str:
    answer = deliver(client, event)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return str(answer.get_json()["status"])


@pytest.mark.parametrize("new_period_shape", [False, True], ids=["api before 2025-03-31", "api from 2025-03-31"])
def test_a_subscription_is_kept_from_either_api_shape(
    client: FlaskClient, engine: Engine, new_period_shape: bool
) -> None:
    end = T + 30 * 86400
    prices = [samples.price("pro_monthly", tier="pro"), samples.price("seats", tier=None)]
    subscription = samples.subscription(
        "cus_Billing1", prices=prices, period_end=end, new_period_shape=new_period_shape, metadata={"plan": "pro"}
    )
    event = samples.event("customer.subscription.created", subscription, created=T)
    assert _status(client, event) == "processed"
    row = _subscription(engine, subscription["id"])
    assert row is not None and row["status"] == "active" and row["stripe_customer_id"] == "cus_Billing1"
    assert int(row["current_period_end"].timestamp()) == end
    assert [(item["lookup_key"], item["tier"], item["quantity"]) for item in row["items"]] == [
        ("pro_monthly", "pro", 1),
        ("seats", None, 1),  # no tier metadata (the tier falls back to lookup keys over every item)
    ]
    assert row["subscription_metadata"]["stripe"] == {"plan": "pro"}
    assert row["subscription_metadata"]["sync"]["event_id"] == event["id"]
    # Filed under its customer, for the customer's timeline.
    assert event_row(engine, event["id"])["stripe_customer_id"] == "cus_Billing1"  # type: ignore[index]


def test_subscription_events_are_ordered_and_a_deleted_one_stays_canceled(client: FlaskClient, engine: Engine) -> None:
    active = samples.subscription("cus_Billing2", status="active")
    canceled = {**active, "status": "canceled", "canceled_at": T + 20, "ended_at": T + 20}
    events = [
        samples.event("customer.subscription.created", active, created=T),
        samples.event("customer.subscription.deleted", canceled, created=T + 20),
        samples.event("customer.subscription.updated", {**active, "status": "past_due"}, created=T + 10),
    ]
    assert [_status(client, event) for event in events] == ["processed", "processed", "stale"]
    row = _subscription(engine, active["id"])
    assert row is not None and row["status"] == "canceled"  # a late update does not raise it again


@pytest.mark.parametrize("reverse", [False, True], ids=["in order", "reversed"])
def test_same_second_subscription_events_are_settled_by_type_and_previous_attributes(
    client: FlaskClient, engine: Engine, reverse: bool
) -> None:
    trialing = samples.subscription("cus_Billing3", status="trialing")
    by_type = [
        samples.event("customer.subscription.created", trialing, created=T),
        samples.event("customer.subscription.updated", {**trialing, "status": "active"}, created=T),
    ]
    second = samples.subscription("cus_Billing3", status="active")
    by_attributes = [
        samples.event(
            "customer.subscription.updated",
            {**second, "cancel_at_period_end": True},
            created=T,
            previous_attributes={"cancel_at_period_end": False},
        ),
        samples.event(
            "customer.subscription.updated",
            {**second, "status": "past_due", "cancel_at_period_end": True},
            created=T,
            previous_attributes={"status": "active"},
        ),
    ]
    for pair, subscription_id, expected in (
        (by_type, trialing["id"], "active"),
        (by_attributes, second["id"], "past_due"),
    ):
        for event in reversed(pair) if reverse else pair:
            _status(client, event)
        row = _subscription(engine, subscription_id)
        assert row is not None and row["status"] == expected, (pair[0]["type"], reverse)


def test_a_subscription_removed_by_hand_is_not_brought_back_by_an_older_event(
    client: FlaskClient, engine: Engine
) -> None:
    subscription = samples.subscription("cus_Billing4")
    assert _status(client, samples.event("customer.subscription.updated", subscription, created=T + 5)) == "processed"
    with engine.connect() as connection:
        connection.execute(
            text("DELETE FROM stripe_subscriptions WHERE stripe_subscription_id = :id"), {"id": subscription["id"]}
        )
    assert _status(client, samples.event("customer.subscription.updated", subscription, created=T + 4)) == "stale"
    assert _subscription(engine, subscription["id"]) is None
    assert _status(client, samples.event("customer.subscription.updated", subscription, created=T + 6)) == "processed"
    audit = "SELECT count(*) FROM stripe_customers_audit WHERE object = 'subscription' AND stripe_id = :id"
    assert count(engine, audit, id=subscription["id"]) == 3  # insert, delete, insert


def test_an_entitlement_summary_replaces_the_set_and_an_older_one_is_stale(client: FlaskClient, engine: Engine) -> None:
    events = [
        samples.event(
            "entitlements.active_entitlement_summary.updated",
            samples.entitlement_summary("cus_Ent1", keys),
            created=created,
        )
        for keys, created in ((["pro", "export"], T), (["pro", "api"], T + 10), (["basic"], T + 5))
    ]
    assert [_status(client, event) for event in events] == ["processed", "processed", "stale"]
    assert _entitlements(engine, "cus_Ent1") == ["api", "pro"]  # export is gone, basic never came


def test_past_ten_entitlements_the_rest_is_read_from_stripe(
    keyed: FlaskClient, fake: FakeStripe, client: FlaskClient, engine: Engine
) -> None:
    keys = [f"feature_{n:02}" for n in range(12)]
    fake.entitlements["cus_Ent2"] = [
        {"id": f"ent_{n}", "object": "entitlements.active_entitlement", "feature": f"feat_{n}", "lookup_key": key}
        for n, key in enumerate(keys)
    ]
    summary = samples.entitlement_summary("cus_Ent2", keys)
    assert (
        _status(keyed, samples.event("entitlements.active_entitlement_summary.updated", summary, created=T))
        == "processed"
    )
    assert _entitlements(engine, "cus_Ent2") == keys
    with engine.connect() as connection:
        complete = connection.execute(
            text("SELECT complete FROM stripe_entitlement_sets WHERE stripe_customer_id = 'cus_Ent2'")
        ).scalar_one()
    assert complete is True

    # Without a key: stored as far as the summary goes, and marked incomplete with the reason.
    summary = samples.entitlement_summary("cus_Ent3", keys)
    assert (
        _status(client, samples.event("entitlements.active_entitlement_summary.updated", summary, created=T))
        == "processed"
    )
    assert _entitlements(engine, "cus_Ent3") == keys[:10]
    with engine.connect() as connection:
        complete, sync = connection.execute(
            text(
                "SELECT complete, entitlements_metadata -> 'sync' FROM stripe_entitlement_sets "
                "WHERE stripe_customer_id = 'cus_Ent3'"
            )
        ).one()
    assert complete is False and "no API key" in sync["note"]


def _active(n: int) -> dict[str, Any]:
    return {
        "id": f"ent_{n}",
        "object": "entitlements.active_entitlement",
        "feature": f"feat_{n}",
        "lookup_key": f"f{n:03}",
    }


def test_more_than_a_page_of_entitlements_and_a_failure_reading_the_rest(
    keyed: FlaskClient, fake: FakeStripe, engine: Engine
) -> None:
    """Stripe lists 100 a page: 150 take two pages, all kept. A Stripe failure while reading the rest
    keeps the summary's ten and marks the set incomplete, saying why."""
    fake.entitlements["cus_Ent4"] = [_active(n) for n in range(150)]
    summary = samples.entitlement_summary("cus_Ent4", [f"f{n:03}" for n in range(150)])  # lists 10
    event = samples.event("entitlements.active_entitlement_summary.updated", summary, created=T)
    assert _status(keyed, event) == "processed"
    assert _entitlements(engine, "cus_Ent4") == [f"f{n:03}" for n in range(150)]
    assert [path for _, path in fake.requests].count("/v1/entitlements/active_entitlements") == 2

    fake.failures = [(500, {"error": {"type": "api_error", "message": "down"}})] * 10
    later = samples.event("entitlements.active_entitlement_summary.updated", summary, created=T + 1)
    assert _status(keyed, later) == "processed"
    assert _entitlements(engine, "cus_Ent4") == [f"f{n:03}" for n in range(10)]
    with engine.connect() as connection:
        complete, sync = connection.execute(
            text(
                "SELECT complete, entitlements_metadata -> 'sync' FROM stripe_entitlement_sets "
                "WHERE stripe_customer_id = 'cus_Ent4'"
            )
        ).one()
    assert complete is False and "could not be read" in sync["note"]


def test_a_same_second_subscription_tie_is_settled_by_stripe(
    keyed: FlaskClient, fake: FakeStripe, engine: Engine
) -> None:
    subscription = samples.subscription("cus_Billing5", status="active")
    fake.subscriptions[subscription["id"]] = {**subscription, "status": "unpaid"}
    fake.clock = T + 30
    first = samples.event("customer.subscription.updated", {**subscription, "status": "past_due"}, created=T)
    second = samples.event("customer.subscription.updated", {**subscription, "status": "active"}, created=T)
    assert [_status(keyed, event) for event in (first, second)] == ["processed", "processed"]
    row = _subscription(engine, subscription["id"])
    assert row is not None and row["status"] == "unpaid"  # what Stripe said at its clock
    assert row["subscription_metadata"]["sync"] | {"synced_at": None} == {
        "status": "synced",
        "source": "api",
        "event_id": None,
        "event_created": T + 30,
        "synced_at": None,
    }
    late = samples.event("customer.subscription.updated", {**subscription, "status": "active"}, created=T + 20)
    assert _status(keyed, late) == "stale"


@pytest.fixture
def paying_user(client: FlaskClient, engine: Engine) -> tuple[str, str]:
    """A user whose customer has an active subscription and the 'pro' entitlement, and another user."""
    user, other = add_user(engine), add_user(engine)
    customer = samples.customer(metadata={"user_id": user})
    _status(client, samples.event("customer.created", customer, created=T))
    end = T + 30 * 86400
    for status, created in (("canceled", T), ("active", T + 1)):
        made = samples.subscription(customer["id"], status=status, period_end=end)
        _status(client, samples.event("customer.subscription.updated", made, created=created))
    summary = samples.entitlement_summary(customer["id"], ["pro", "export"])
    _status(client, samples.event("entitlements.active_entitlement_summary.updated", summary, created=T))
    return user, other


def test_has_access_as_each_role(engine: Engine, paying_user: tuple[str, str]) -> None:
    user, other = paying_user
    ask = text("SELECT stripe_has_access(:feature)")
    with acting_as(engine, "authenticated", user) as connection:
        assert connection.execute(ask, {"feature": "pro"}).scalar_one() is True
        assert connection.execute(ask, {"feature": "enterprise"}).scalar_one() is False
        # The two-argument form is the service role's: a user may not ask about anyone.
        with pytest.raises(Exception, match="permission denied"), connection.begin_nested():
            connection.execute(text("SELECT stripe_has_access('pro', :u)"), {"u": user})
    with acting_as(engine, "authenticated", other) as connection:
        assert connection.execute(ask, {"feature": "pro"}).scalar_one() is False
    with acting_as(engine, "anon") as connection:
        assert connection.execute(ask, {"feature": "pro"}).scalar_one() is False
    with acting_as(engine, "service_role") as connection:
        about = text("SELECT stripe_has_access(:feature, :user)")
        assert connection.execute(about, {"feature": "pro", "user": user}).scalar_one() is True
        assert connection.execute(about, {"feature": "pro", "user": other}).scalar_one() is False


def test_has_access_inside_an_apps_own_policy(engine: Engine, paying_user: tuple[str, str]) -> None:
    user, other = paying_user
    with engine.connect() as connection:
        connection.execute(
            text(
                "DROP TABLE IF EXISTS public.app_reports; "
                "CREATE TABLE public.app_reports (id int PRIMARY KEY, title text); "
                "INSERT INTO public.app_reports VALUES (1, 'quarterly'); "
                "ALTER TABLE public.app_reports ENABLE ROW LEVEL SECURITY; "
                "CREATE POLICY pro_only ON public.app_reports FOR SELECT USING (stripe_has_access('pro')); "
                "GRANT SELECT ON public.app_reports TO authenticated"
            )
        )
    try:
        reports = text("SELECT title FROM public.app_reports")
        with acting_as(engine, "authenticated", user) as connection:
            assert connection.execute(reports).scalars().all() == ["quarterly"]
        with acting_as(engine, "authenticated", other) as connection:
            assert connection.execute(reports).scalars().all() == []
    finally:
        with engine.connect() as connection:
            connection.execute(text("DROP TABLE public.app_reports"))


def test_user_billing_shows_each_user_their_own_row(engine: Engine, paying_user: tuple[str, str]) -> None:
    user, other = paying_user
    view = text("SELECT user_id::text, plan_status, tier, entitlements, cancel_at_period_end FROM stripe_user_billing")
    with acting_as(engine, "authenticated", user) as connection:
        assert [tuple(row) for row in connection.execute(view)] == [(user, "active", "pro", ["export", "pro"], False)]
    with acting_as(engine, "authenticated", other) as connection:
        assert connection.execute(view).all() == []
    with acting_as(engine, "service_role") as connection:
        assert [row[0] for row in connection.execute(view)] == [user]
    with acting_as(engine, "anon") as connection, pytest.raises(Exception, match="permission denied"):
        connection.execute(view)


def test_the_api_roles_write_no_billing_table(engine: Engine, paying_user: tuple[str, str]) -> None:
    user, _ = paying_user
    with acting_as(engine, "authenticated", user) as connection:
        for statement in (
            "UPDATE stripe_subscriptions SET status = 'active'",
            "INSERT INTO stripe_entitlements VALUES ('cus_X', 'pro', NULL, NULL)",
            "DELETE FROM stripe_entitlement_sets",
            "SELECT * FROM stripe_subscriptions",
            "SELECT stripe_apply_subscription('{}'::jsonb, 'webhook', NULL, 0)",
        ):
            with pytest.raises(Exception, match="permission denied"), connection.begin_nested():
                connection.execute(text(statement))
    assert json.dumps(_entitlements(engine, "cus_X")) == "[]"


def test_backfill_verify_and_replay_cover_subscriptions_and_entitlements(
    client: FlaskClient, engine: Engine, database_url: str
) -> None:
    from tests.support import SECRET, cli

    fake = FakeStripe()
    customer = fake.add_customer()
    subscription = samples.subscription(customer["id"], status="active")
    fake.subscriptions[subscription["id"]] = subscription
    fake.entitlements[customer["id"]] = [
        {"id": "ent_1", "object": "entitlements.active_entitlement", "feature": "feat_1", "lookup_key": "pro"}
    ]
    card = samples.payment_method(customer["id"], last4="1881")
    fake.payment_methods = {card["id"]: card}
    # A subscription event Stripe sent while nobody listened; its price carries unit_amount_decimal.
    missed = samples.event("customer.subscription.updated", samples.subscription(customer["id"]), created=now() - 60)
    fake.events.append(missed)
    with fake.serving() as base:
        env = {"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": SECRET, "STRIPE_API_BASE": base}
        env["STRIPE_API_KEY"] = "sk_test_fake"
        backfilled = cli("backfill", **env)
        assert backfilled.returncode == 0, backfilled.stderr
        written = "then 1 subscriptions, 1 entitlement sets, 1 payment methods and 0 invoices: 3 written"
        assert written in backfilled.stdout
        assert _subscription(engine, subscription["id"])["status"] == "active"  # type: ignore[index]
        assert _entitlements(engine, customer["id"]) == ["pro"]
        assert [row[3] for row in _payment_methods(engine, customer["id"])] == ["1881"]
        assert cli("verify", **env).returncode == 0

        # Stripe moves on without a webhook: verify finds both, --fix applies Stripe's state.
        fake.subscriptions[subscription["id"]] = {**subscription, "status": "past_due"}
        fake.entitlements[customer["id"]] = []
        renewed = samples.payment_method(customer["id"], last4="5005")
        fake.payment_methods = {renewed["id"]: renewed}  # the old card detached, a new one attached
        drifted = cli("verify", **env)
        assert drifted.returncode == 1
        assert f"drift subscription {subscription['id']}: changed (status differ)" in drifted.stdout
        assert f"drift entitlements {customer['id']}: changed (entitlements differ)" in drifted.stdout
        assert f"drift payment_method {card['id']}: missing" in drifted.stdout
        assert f"drift payment_method {renewed['id']}: changed (card differ)" in drifted.stdout
        assert cli("verify", "--fix", **env).returncode == 0
        assert _subscription(engine, subscription["id"])["status"] == "past_due"  # type: ignore[index]
        assert _entitlements(engine, customer["id"]) == []
        assert [row[0] for row in _payment_methods(engine, customer["id"])] == [renewed["id"]]

        recovered = cli("replay", "--from-stripe", **env)
        assert recovered.returncode == 0, recovered.stderr
        assert event_row(engine, missed["id"])["status"] == "processed"  # type: ignore[index]


def _payment_methods(engine: Engine, customer_id: str) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                text(
                    "SELECT stripe_payment_method_id, type, brand, last4, exp_month, exp_year "
                    "FROM stripe_payment_methods WHERE stripe_customer_id = :c ORDER BY 1"
                ),
                {"c": customer_id},
            )
        ]


def test_payment_methods_keep_the_card_summary_and_a_detach_outlives_a_late_attach(
    client: FlaskClient, engine: Engine
) -> None:
    method = samples.payment_method("cus_Pm1", last4="1111", exp_year=2031)
    attached = samples.event("payment_method.attached", method, created=T)
    expiry = {**method, "card": {**method["card"], "exp_year": 2033}}
    updated = samples.event("payment_method.automatically_updated", expiry, created=T + 5)
    assert [_status(client, event) for event in (updated, attached)] == ["processed", "stale"]
    assert _payment_methods(engine, "cus_Pm1") == [(method["id"], "card", "visa", "1111", 12, 2033)]
    with engine.connect() as connection:  # nothing more of the card than the summary
        stored = connection.execute(
            text("SELECT to_jsonb(m) FROM stripe_payment_methods m WHERE stripe_payment_method_id = :id"),
            {"id": method["id"]},
        ).scalar_one()
    assert "fingerprint" not in json.dumps(stored) and "funding" not in json.dumps(stored)

    detached = samples.event(
        "payment_method.detached",
        {**method, "customer": None},
        created=T + 10,
        previous_attributes={"customer": "cus_Pm1"},
    )
    assert _status(client, detached) == "processed"
    assert _payment_methods(engine, "cus_Pm1") == []
    assert event_row(engine, detached["id"])["stripe_customer_id"] == "cus_Pm1"  # type: ignore[index]
    late = samples.event("payment_method.attached", method, created=T + 9)  # delivered after the detach
    assert _status(client, late) == "stale"
    assert _payment_methods(engine, "cus_Pm1") == []


def test_a_thin_payment_method_event_reads_stripe(
    keyed: FlaskClient, keyed_settings: Settings, fake: FakeStripe, engine: Engine
) -> None:
    method = samples.payment_method("cus_Pm2", last4="4444")
    fake.payment_methods = {method["id"]: method}
    for thin_type in ("v1.payment_method.attached", "v1.payment_method.detached"):
        notification = samples.thin_event(thin_type, method["id"])
        assert _status(keyed, notification) == "queued"
        assert read_waiting(engine, keyed_settings) == 1
        assert event_row(engine, notification["id"])["status"] == "processed"  # type: ignore[index]
        if thin_type.endswith("attached"):
            assert [row[3] for row in _payment_methods(engine, "cus_Pm2")] == ["4444"]
            fake.payment_methods[method["id"]] = {**method, "customer": None}  # detached since
    assert _payment_methods(engine, "cus_Pm2") == []
