"""Organizations: a customer billing an organization (its metadata or its checkout's), never stolen
and handed on like a user link; organizations.subscription_tier kept from the best subscription in
any delivery order; members' access through stripe_has_access and stripe_user_billing; an app
without organizations; migrate on an app's organizations that hold rows."""

from __future__ import annotations

import json
import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.server import gunicorn, post_event
from tests.support import (
    add_user,
    count,
    customer_row,
    deliver,
    now,
    settings_for,
    unlinked_by_hand_then_verified,
    wait_for,
    waiting_on_locks,
)
from tests.test_rls import acting_as
from webhook import database, migrations, samples
from webhook.app import create_app
from webhook.config import Keys
from webhook.objects import HANDLERS

T = now() - 3600


def add_organization(engine: Engine, tier: str = "free", members: tuple[str, ...] = ()) -> str:
    organization = str(uuid.uuid4())
    with engine.connect() as connection:
        connection.execute(
            text("INSERT INTO public.organizations (id, name, subscription_tier) VALUES (:id, 'Acme', :tier)"),
            {"id": organization, "tier": tier},
        )
        for user in members:
            connection.execute(
                text("INSERT INTO public.organization_members (organization_id, user_id) VALUES (:o, :u)"),
                {"o": organization, "u": user},
            )
    return organization


def tier_of(engine: Engine, organization: str) -> str:
    with engine.connect() as connection:
        return str(
            connection.execute(
                text("SELECT subscription_tier FROM public.organizations WHERE id = :id"), {"id": organization}
            ).scalar_one()
        )


def tier_audit(engine: Engine, organization: str) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [
            tuple(row)
            for row in connection.execute(
                text(
                    "SELECT old_row ->> 'subscription_tier', new_row ->> 'subscription_tier', event_id "
                    "FROM stripe_customers_audit WHERE object = 'organization' AND stripe_id = :id ORDER BY id"
                ),
                {"id": organization},
            )
        ]


def status_of(client: FlaskClient, event: dict[str, Any]) -> str:
    answer = deliver(client, event)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return str(answer.get_json()["status"])


def billing(organization: str, customer_id: str | None = None, **metadata: str) -> dict[str, Any]:
    return samples.customer(customer_id, metadata={"organization_id": organization, **metadata})


@pytest.mark.parametrize("customer_first", [True, False], ids=["customer first", "subscription first"])
def test_the_tier_follows_the_best_subscription_in_either_delivery_order(
    client: FlaskClient, engine: Engine, customer_first: bool
) -> None:
    organization = add_organization(engine)
    customer = billing(organization)
    team = samples.subscription(customer["id"], prices=[samples.price("team_monthly", tier="team")])
    created = samples.event("customer.created", customer, created=T)
    subscribed = samples.event("customer.subscription.created", team, created=T + 1)
    for event in (created, subscribed) if customer_first else (subscribed, created):
        assert status_of(client, event) == "processed"
    assert customer_row(engine, customer["id"])["organization_id"] == uuid.UUID(organization)  # type: ignore[index]
    assert tier_of(engine, organization) == "team"
    # Audited with the event that moved it (the second delivered: the first found no link or no plan).
    moved_by = (subscribed if customer_first else created)["id"]
    assert tier_audit(engine, organization) == [("free", "team", moved_by)]

    canceled = {**team, "status": "canceled", "canceled_at": T + 20, "ended_at": T + 20}
    deleted = samples.event("customer.subscription.deleted", canceled, created=T + 20)
    assert status_of(client, deleted) == "processed"
    assert tier_of(engine, organization) == "free"
    # A late update of the subscription, from before its cancellation, does not raise the tier back.
    late = samples.event("customer.subscription.updated", {**team, "cancel_at_period_end": True}, created=T + 10)
    assert status_of(client, late) == "stale"
    assert tier_of(engine, organization) == "free"
    assert tier_audit(engine, organization)[-1] == ("team", "free", deleted["id"])


def test_the_tier_is_the_first_price_naming_one_in_any_item_of_the_oldest_active_subscription(
    client: FlaskClient, engine: Engine
) -> None:
    """CONTRACT §7 (amended 2026-12-06): over the active subscriptions (else the trialing ones), oldest
    first and in item order, the first price with tier metadata, else the first with a lookup key."""
    owner = add_user(engine)
    organization = add_organization(engine, members=(owner,))
    customer = billing(organization)
    assert status_of(client, samples.event("customer.created", customer, created=T)) == "processed"
    addon = samples.price("extra_seats", tier=None)  # an add-on: a lookup key, no tier
    plan = samples.subscription(customer["id"], prices=[addon, samples.price("pro_monthly", tier="pro")])
    assert status_of(client, samples.event("customer.subscription.created", plan, created=T + 1)) == "processed"
    assert tier_of(engine, organization) == "pro"  # not the add-on's lookup key
    with acting_as(engine, "service_role") as connection:
        view_tier = connection.execute(
            text("SELECT tier FROM stripe_user_billing WHERE user_id = :u"), {"u": owner}
        ).scalar_one()
    assert view_tier == "pro"  # the view's tier by the same rule

    # A trialing subscription, older than the plan, naming another tier: the active one still decides.
    trial = {
        **samples.subscription(customer["id"], status="trialing", prices=[samples.price("team_monthly", tier="team")]),
        "created": plan["created"] - 1000,
    }
    assert status_of(client, samples.event("customer.subscription.created", trial, created=T + 2)) == "processed"
    assert tier_of(engine, organization) == "pro"
    # A second active subscription, older, whose prices name no tier but a lookup key: the plan's
    # metadata still wins over any lookup key; an older one that names a tier wins over the plan.
    seats = {**samples.subscription(customer["id"], prices=[addon]), "created": plan["created"] - 500}
    assert status_of(client, samples.event("customer.subscription.created", seats, created=T + 3)) == "processed"
    assert tier_of(engine, organization) == "pro"
    legacy = {
        **samples.subscription(customer["id"], prices=[samples.price("legacy_plan", tier="legacy")]),
        "created": plan["created"] - 100,
    }
    assert status_of(client, samples.event("customer.subscription.created", legacy, created=T + 4)) == "processed"
    assert tier_of(engine, organization) == "legacy"
    # Only lookup keys left among the active ones: the first of them, in age then item order.
    for gone, at in ((legacy, T + 5), (plan, T + 6)):
        ended = {**gone, "status": "canceled", "canceled_at": at, "ended_at": at}
        assert status_of(client, samples.event("customer.subscription.deleted", ended, created=at)) == "processed"
    assert tier_of(engine, organization) == "extra_seats"


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["in order", "reversed"])
def test_a_same_second_pair_ends_in_the_later_state_either_way(
    client: FlaskClient, engine: Engine, order: tuple[int, int]
) -> None:
    organization = add_organization(engine)
    customer = billing(organization)
    status_of(client, samples.event("customer.created", customer, created=T))
    trialing = samples.subscription(
        customer["id"], status="trialing", prices=[samples.price("team_monthly", tier="team")]
    )
    status_of(client, samples.event("customer.subscription.created", trialing, created=T + 5))
    assert tier_of(engine, organization) == "team"  # trialing counts
    active = {**trialing, "status": "active"}
    canceled = {**trialing, "status": "canceled", "canceled_at": T + 10, "ended_at": T + 10}
    pair = [
        samples.event(
            "customer.subscription.updated", active, created=T + 10, previous_attributes={"status": "trialing"}
        ),
        samples.event("customer.subscription.deleted", canceled, created=T + 10),
    ]
    for index in order:
        status_of(client, pair[index])
    assert tier_of(engine, organization) == "free"


def test_a_checkout_links_the_organization_its_metadata_names(client: FlaskClient, engine: Engine) -> None:
    organization = add_organization(engine)
    customer = samples.customer()
    status_of(client, samples.event("customer.created", customer, created=T))
    session = samples.checkout_session(customer["id"], None, email="team@example.com", name="Team")
    session["metadata"] = {"organization_id": organization}
    assert status_of(client, samples.event("checkout.session.completed", session, created=T + 1)) == "processed"
    row = customer_row(engine, customer["id"])
    assert row is not None and row["organization_id"] == uuid.UUID(organization)
    assert row["customer_metadata"]["sync"]["status"] == "synced"  # billing an organization is a link


def test_two_customers_naming_one_organization(client: FlaskClient, engine: Engine) -> None:
    organization = add_organization(engine)
    first, second = billing(organization), billing(organization)
    status_of(client, samples.event("customer.created", first, created=T))
    status_of(client, samples.event("customer.created", second, created=T + 1))
    pro = samples.subscription(second["id"], prices=[samples.price("pro_monthly", tier="pro")])
    status_of(client, samples.event("customer.subscription.created", pro, created=T + 2))

    # The first keeps it; the second is unlinked, says why, and its plan does not reach the tier.
    assert customer_row(engine, first["id"])["organization_id"] == uuid.UUID(organization)  # type: ignore[index]
    refused = customer_row(engine, second["id"])
    assert refused is not None and refused["organization_id"] is None
    assert refused["customer_metadata"]["sync"]["status"] == "unlinked"
    assert "already billed by another customer" in refused["customer_metadata"]["sync"]["note"]
    assert tier_of(engine, organization) == "free"

    # The first goes: the second takes the organization over, and its plan the tier.
    status_of(client, samples.event("customer.deleted", first, created=T + 3))
    taken = customer_row(engine, second["id"])
    assert taken is not None and taken["organization_id"] == uuid.UUID(organization)
    assert taken["customer_metadata"]["sync"]["status"] == "synced"
    assert tier_of(engine, organization) == "pro"
    assert count(engine, "SELECT count(*) FROM stripe_organization_claims") == 0


def test_a_customer_moving_to_another_organization_hands_the_first_on(client: FlaskClient, engine: Engine) -> None:
    old, new = add_organization(engine), add_organization(engine)
    mover, waiting = billing(old), billing(old)
    for created, customer in enumerate((mover, waiting)):
        status_of(client, samples.event("customer.created", customer, created=T + created))
    pro = samples.subscription(mover["id"], prices=[samples.price("pro_monthly", tier="pro")])
    status_of(client, samples.event("customer.subscription.created", pro, created=T + 2))
    assert tier_of(engine, old) == "pro"
    status_of(client, samples.event("customer.updated", {**mover, "metadata": {"organization_id": new}}, created=T + 3))
    assert customer_row(engine, mover["id"])["organization_id"] == uuid.UUID(new)  # type: ignore[index]
    assert customer_row(engine, waiting["id"])["organization_id"] == uuid.UUID(old)  # type: ignore[index]
    assert (tier_of(engine, old), tier_of(engine, new)) == ("free", "pro")


def test_members_have_the_organizations_access_until_removed(client: FlaskClient, engine: Engine) -> None:
    member, outsider, owner = add_user(engine), add_user(engine), add_user(engine)
    organization = add_organization(engine, members=(member, owner))
    # The owner also has a customer of their own, with a lesser plan.
    own = samples.customer(metadata={"user_id": owner})
    status_of(client, samples.event("customer.created", own, created=T))
    status_of(
        client,
        samples.event(
            "customer.subscription.created",
            samples.subscription(own["id"], status="past_due", prices=[samples.price("solo", tier="solo")]),
            created=T,
        ),
    )
    customer = billing(organization)
    status_of(client, samples.event("customer.created", customer, created=T))
    team = samples.subscription(customer["id"], prices=[samples.price("team_monthly", tier="team")])
    status_of(client, samples.event("customer.subscription.created", team, created=T + 1))
    summary = samples.entitlement_summary(customer["id"], ["reports"])
    status_of(client, samples.event("entitlements.active_entitlement_summary.updated", summary, created=T + 1))

    ask = text("SELECT stripe_has_access('reports')")
    view = text(
        "SELECT user_id::text, stripe_customer_id, organization_id::text, plan_status, tier, entitlements "
        "FROM stripe_user_billing"
    )
    with acting_as(engine, "authenticated", member) as connection:
        assert connection.execute(ask).scalar_one() is True
        assert [tuple(row) for row in connection.execute(view)] == [
            (member, customer["id"], organization, "active", "team", ["reports"])
        ]
    with acting_as(engine, "authenticated", owner) as connection:
        # Their own customer, the organization's better plan.
        assert [tuple(row) for row in connection.execute(view)] == [
            (owner, own["id"], organization, "active", "team", ["reports"])
        ]
    with acting_as(engine, "authenticated", outsider) as connection:
        assert connection.execute(ask).scalar_one() is False
        assert connection.execute(view).all() == []
    with acting_as(engine, "service_role") as connection:
        assert sorted(row[0] for row in connection.execute(view)) == sorted([member, owner])
        about = text("SELECT stripe_has_access('reports', :u)")
        assert connection.execute(about, {"u": member}).scalar_one() is True

    with engine.connect() as connection:
        connection.execute(text("DELETE FROM public.organization_members WHERE user_id = :u"), {"u": member})
    with acting_as(engine, "authenticated", member) as connection:
        assert connection.execute(ask).scalar_one() is False  # at once: a query, not a copy
        assert connection.execute(view).all() == []


def test_between_equal_subscriptions_the_members_own_customer_wins(client: FlaskClient, engine: Engine) -> None:
    owner = add_user(engine)
    organization = add_organization(engine, members=(owner,))
    end = int(T) + 30 * 86400
    own = samples.customer(metadata={"user_id": owner})
    customer = billing(organization)
    for payer, tier in ((customer, "team"), (own, "solo")):
        status_of(client, samples.event("customer.created", payer, created=T))
        subscription = samples.subscription(payer["id"], prices=[samples.price(tier, tier=tier)], period_end=end)
        status_of(client, samples.event("customer.subscription.created", subscription, created=T))

    view = text("SELECT stripe_customer_id, organization_id::text, plan_status, tier FROM stripe_user_billing")
    with acting_as(engine, "authenticated", owner) as connection:
        # Same status, same period end: their own customer's plan; their organization all the same.
        assert [tuple(row) for row in connection.execute(view)] == [(own["id"], organization, "active", "solo")]


def test_a_deleted_organization_lets_go_of_its_customer(client: FlaskClient, engine: Engine) -> None:
    organization = add_organization(engine)
    customer = billing(organization)
    status_of(client, samples.event("customer.created", customer, created=T))
    with engine.connect() as connection:
        connection.execute(text("DELETE FROM public.organizations WHERE id = :id"), {"id": organization})
    row = customer_row(engine, customer["id"])
    assert row is not None and row["organization_id"] is None  # the link goes, the customer stays
    sync = row["customer_metadata"]["sync"]  # and says why it now bills nobody
    assert sync["status"] == "unlinked" and sync["note"] == f"its organization {organization} was deleted"
    # A later event naming it again is noted, not an error.
    assert status_of(client, samples.event("customer.updated", customer, created=T + 1)) == "processed"
    note = customer_row(engine, customer["id"])["customer_metadata"]["sync"]["note"]  # type: ignore[index]
    assert "no public.organizations row" in note


def test_an_unknown_or_malformed_organization_is_noted(client: FlaskClient, engine: Engine) -> None:
    user = add_user(engine)
    unknown = billing(str(uuid.uuid4()), user_id=user)
    malformed = billing("acme-inc")
    for customer in (unknown, malformed):
        status_of(client, samples.event("customer.created", customer, created=T))
    row = customer_row(engine, unknown["id"])
    assert row is not None and row["user_id"] == uuid.UUID(user) and row["organization_id"] is None
    assert row["customer_metadata"]["sync"]["status"] == "unlinked"
    assert "no public.organizations row" in row["customer_metadata"]["sync"]["note"]
    note = customer_row(engine, malformed["id"])["customer_metadata"]["sync"]["note"]  # type: ignore[index]
    assert "metadata.organization_id is not a UUID" in note


def test_the_free_tier_is_configurable(database_url: str, engine: Engine) -> None:
    """STRIPE_FREE_TIER reaches every change that can lower a tier: a link, a subscription's end, a
    customer's deletion."""
    client = create_app(settings_for(database_url, STRIPE_FREE_TIER="starter")).test_client()
    for ended_by in ("customer.subscription.deleted", "customer.deleted"):
        organization = add_organization(engine, tier="team")
        customer = billing(organization)
        status_of(client, samples.event("customer.created", customer, created=T))
        assert tier_of(engine, organization) == "starter"  # billed, with no active or trialing plan
        plan = samples.subscription(customer["id"], prices=[samples.price("team_monthly", tier="team")])
        status_of(client, samples.event("customer.subscription.created", plan, created=T + 1))
        assert tier_of(engine, organization) == "team"
        canceled = {**plan, "status": "canceled", "canceled_at": T + 2, "ended_at": T + 2}
        ended = canceled if ended_by == "customer.subscription.deleted" else customer
        status_of(client, samples.event(ended_by, ended, created=T + 2))
        assert tier_of(engine, organization) == "starter", ended_by


def test_concurrent_links_and_subscriptions_under_gunicorn(database_url: str, engine: Engine) -> None:
    """A checkout's customer.created and customer.subscription.created arrive together: whichever
    commits first, the tier must end from the subscription."""
    organizations = [add_organization(engine) for _ in range(12)]
    events = []
    for created, organization in enumerate(organizations):
        customer = billing(organization)
        plan = samples.subscription(customer["id"], prices=[samples.price("team_monthly", tier="team")])
        events += [
            samples.event("customer.created", customer, created=T + created),
            samples.event("customer.subscription.created", plan, created=T + created),
        ]
    random.Random(7).shuffle(events)
    with gunicorn(database_url, workers=2) as (port, _), ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda event: post_event(port, event), events))
    assert {status for status, _ in answers} == {200}
    assert [tier_of(engine, organization) for organization in organizations] == ["team"] * len(organizations)


def _apply(connection: Any, event: dict[str, Any]) -> None:
    change = HANDLERS[event["type"]](event["data"]["object"], Keys()).as_json()  # type: ignore[union-attr]
    connection.execute(
        text("SELECT stripe_apply_event(CAST(:e AS jsonb), CAST(:c AS jsonb), 'webhook')"),
        {"e": json.dumps(event), "c": json.dumps(change)},
    )


def test_a_link_made_while_a_subscription_is_being_written_waits_for_it(engine: Engine) -> None:
    """The window the gunicorn test above can only hope to hit, held open: a subscription written
    but not committed when its customer's link to an organization is applied."""
    organization = add_organization(engine)
    customer = billing(organization)
    plan = samples.subscription(customer["id"], prices=[samples.price("team_monthly", tier="team")])
    with engine.connect() as writing:
        writing.execute(text("BEGIN"))  # the engine autocommits: a transaction of its own, held open
        _apply(writing, samples.event("customer.subscription.created", plan, created=T))
        with ThreadPoolExecutor(max_workers=1) as pool:
            linking = pool.submit(_apply_alone, engine, samples.event("customer.created", customer, created=T))
            # The link waits on the subscription's transaction (or, wrongly, is done).
            wait_for(lambda: linking.done() or waiting_on_locks(engine) >= 1, 10)
            assert not linking.done()
            writing.execute(text("COMMIT"))
            linking.result(timeout=10)
    assert tier_of(engine, organization) == "team"


def _apply_alone(engine: Engine, event: dict[str, Any]) -> None:
    with engine.connect() as connection:
        _apply(connection, event)


def test_migrate_keeps_an_apps_organizations_and_their_rows(scratch_url: str) -> None:
    scratch = database.make_engine(scratch_url, pool_size=1)
    with scratch.connect() as connection:
        # The app's own tables, made before the consumer arrives, with rows and a tier set by hand.
        database.run_sql(
            connection,
            "DROP TABLE public.organization_members, public.organizations; "
            "CREATE TABLE public.organizations (id uuid PRIMARY KEY, name text NOT NULL, "
            "subscription_tier text NOT NULL DEFAULT 'free', created_at timestamptz DEFAULT now()); "
            "CREATE TABLE public.organization_members (organization_id uuid REFERENCES public.organizations, "
            "user_id uuid REFERENCES auth.users, role text, PRIMARY KEY (organization_id, user_id)); "
            "INSERT INTO public.organizations (id, name, subscription_tier) "
            "SELECT gen_random_uuid(), 'org ' || n, CASE WHEN n % 2 = 0 THEN 'enterprise' ELSE 'free' END "
            "FROM generate_series(1, 50) AS n",
        )
    migrations.migrate(scratch, shim=True)
    migrations.migrate(scratch, shim=True)  # again: nothing changes
    assert count(scratch, "SELECT count(*) FROM public.organizations") == 50
    assert count(scratch, "SELECT count(*) FROM public.organizations WHERE subscription_tier = 'enterprise'") == 25
    assert count(scratch, "SELECT count(*) FROM public.organizations WHERE name IS NULL") == 0
    key = "SELECT count(*) FROM pg_constraint WHERE conname = 'stripe_customers_organization_id_fkey' AND convalidated"
    assert count(scratch, key) == 1
    unique = (
        "SELECT count(*) FROM pg_constraint WHERE conname = 'stripe_customers_organization_id_key' AND contype = 'u'"
    )
    assert count(scratch, unique) == 1
    with scratch.connect() as connection:
        assert "organizations" in str(
            connection.execute(text("SELECT obj_description('public.stripe_user_billing'::regclass)")).scalar_one()
        )
    scratch.dispose()


def test_an_organizations_table_of_another_shape_is_refused(scratch_url: str) -> None:
    scratch = database.make_engine(scratch_url, pool_size=1)
    with scratch.connect() as connection:
        database.run_sql(
            connection,
            "DROP TABLE public.organization_members, public.organizations; "
            "CREATE TABLE public.organizations (id bigint PRIMARY KEY, name text)",
        )
    with pytest.raises(migrations.MigrationFailed, match="its id is not a uuid; it has no subscription_tier"):
        migrations.migrate(scratch, shim=False)
    scratch.dispose()


def test_an_app_without_organizations_loses_nothing(scratch_url: str) -> None:
    scratch = database.make_engine(scratch_url, pool_size=1)
    with scratch.connect() as connection:
        database.run_sql(connection, "DROP TABLE public.organization_members, public.organizations")
    migrations.migrate(scratch, shim=False)
    user = add_user(scratch)
    client = create_app(settings_for(scratch_url), scratch).test_client()
    customer = billing(str(uuid.uuid4()), user_id=user)
    assert status_of(client, samples.event("customer.created", customer, created=T)) == "processed"
    row = customer_row(scratch, customer["id"])
    assert row is not None and row["organization_id"] is None and row["user_id"] == uuid.UUID(user)
    assert row["customer_metadata"]["sync"]["status"] == "synced"  # organizations are off: nothing to note
    summary = samples.entitlement_summary(customer["id"], ["pro"])
    status_of(client, samples.event("entitlements.active_entitlement_summary.updated", summary, created=T))
    with acting_as(scratch, "authenticated", user) as connection:
        assert connection.execute(text("SELECT stripe_has_access('pro')")).scalar_one() is True
        assert connection.execute(text("SELECT organization_id FROM stripe_user_billing")).scalar_one() is None
    scratch.dispose()


def test_verify_finds_and_fix_mends_an_organization_left_unlinked(
    client: FlaskClient, engine: Engine, database_url: str
) -> None:
    organization = add_organization(engine)
    linked, waiting = billing(organization), billing(organization)
    for created, customer in enumerate((linked, waiting)):
        status_of(client, samples.event("customer.created", customer, created=T + created))
    unlinked_by_hand_then_verified(engine, database_url, "organization", linked, waiting)
    row = customer_row(engine, waiting["id"])
    assert row is not None and row["organization_id"] == uuid.UUID(organization)
    assert "linked to its organization by reconciliation" in row["customer_metadata"]["sync"]["note"]


@pytest.mark.parametrize("deleted_first", [True, False], ids=["deleted then updated", "updated then deleted"])
def test_a_same_second_deletion_stays_with_stripe_unreadable(
    database_url: str, engine: Engine, deleted_first: bool
) -> None:
    """Rule 1 orders a subscription's .deleted after anything else of its second, so neither the
    delivery order nor an unreachable Stripe (rule 3 falling back to rule 4) brings it back."""
    unreadable = settings_for(database_url, STRIPE_API_KEY="sk_test_fake", STRIPE_API_BASE="http://127.0.0.1:9")
    client = create_app(unreadable, engine).test_client()
    organization = add_organization(engine)
    customer = billing(organization)
    team = samples.subscription(customer["id"], prices=[samples.price("team_monthly", tier="team")])
    assert status_of(client, samples.event("customer.created", customer, created=T)) == "processed"
    assert status_of(client, samples.event("customer.subscription.created", team, created=T)) == "processed"
    assert tier_of(engine, organization) == "team"
    canceled = {**team, "status": "canceled", "canceled_at": T + 30, "ended_at": T + 30}
    deleted = samples.event("customer.subscription.deleted", canceled, created=T + 30)
    updated = samples.event("customer.subscription.updated", {**team, "cancel_at_period_end": True}, created=T + 30)
    first, second = (deleted, updated) if deleted_first else (updated, deleted)
    assert status_of(client, first) == "processed"
    assert status_of(client, second) == ("stale" if deleted_first else "processed")
    with engine.connect() as connection:
        kept = connection.execute(
            text("SELECT status FROM stripe_subscriptions WHERE stripe_subscription_id = :s"), {"s": team["id"]}
        ).scalar_one()
    assert kept == "canceled"
    assert tier_of(engine, organization) == "free"
