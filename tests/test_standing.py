"""Payment standing (who keeps access while a payment fails): each payment state and the columns
of stripe_user_billing, STRIPE_PAST_DUE_GRACE cutting access at its end and invoice.paid restoring
it at once, the organization path, and the setting reaching SQL through stripe_settings."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.support import add_user, deliver, now, settings_for
from tests.test_rls import acting_as
from webhook import samples
from webhook.app import create_app

DAY = 86400
T = now()


def _status(client: FlaskClient, event: dict[str, Any]) -> str:
    answer = deliver(client, event)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return str(answer.get_json()["status"])


def _paying(client: FlaskClient, engine: Engine, status: str = "active") -> tuple[str, str, dict[str, Any]]:
    """A user whose customer has a subscription and the 'pro' entitlement: (user, customer, subscription)."""
    user = add_user(engine)
    customer = samples.customer(metadata={"user_id": user})
    _status(client, samples.event("customer.created", customer, created=T - 40 * DAY))
    subscription = samples.subscription(customer["id"], status=status)
    _status(client, samples.event("customer.subscription.updated", subscription, created=T - 40 * DAY))
    summary = samples.entitlement_summary(customer["id"], ["pro"])
    _status(client, samples.event("entitlements.active_entitlement_summary.updated", summary, created=T - 40 * DAY))
    return user, customer["id"], subscription


def _row(engine: Engine, user: str) -> dict[str, Any]:
    with acting_as(engine, "authenticated", user) as connection:
        found = connection.execute(
            text(
                "SELECT payment_state, payment_failing_since, amount_overdue, overdue_currency, pay_url, grace_ends_at "
                "FROM stripe_user_billing"
            )
        ).one()
    return dict(found._mapping)


def _access(engine: Engine, user: str) -> bool:
    with acting_as(engine, "authenticated", user) as connection:
        return bool(connection.execute(text("SELECT stripe_has_access('pro')")).scalar_one())


def _failed(customer: str, subscription: dict[str, Any], *, at: int, **fields: Any) -> dict[str, Any]:
    invoice = samples.invoice(customer, subscription_id=subscription["id"], attempt_count=1, amount=2500)
    return samples.event("invoice.payment_failed", {**invoice, **fields}, created=at)


def test_each_payment_state(client: FlaskClient, engine: Engine) -> None:
    user, customer, subscription = _paying(client, engine)
    assert _row(engine, user)["payment_state"] == "ok"

    action = samples.invoice(customer, subscription_id=subscription["id"], attempt_count=1)
    _status(client, samples.event("invoice.payment_action_required", action, created=T - 2 * DAY))
    assert _row(engine, user)["payment_state"] == "action_required"  # over failing, for this invoice

    failing = _failed(customer, subscription, at=T - DAY)
    _status(client, failing)
    assert _row(engine, user)["payment_state"] == "failing"

    _status(client, samples.event("customer.subscription.updated", {**subscription, "status": "past_due"}, created=T))
    assert _row(engine, user)["payment_state"] == "past_due"

    _status(client, samples.event("customer.subscription.updated", {**subscription, "status": "unpaid"}, created=T + 1))
    assert _row(engine, user)["payment_state"] == "unpaid"


def test_an_uncollectible_invoice_is_unpaid_only_beside_a_live_subscription(
    client: FlaskClient, engine: Engine, database_url: str
) -> None:
    user, customer, subscription = _paying(client, engine)
    create_app(settings_for(database_url, STRIPE_PAST_DUE_GRACE="7 days"), engine)
    one_off = samples.invoice(customer, status="uncollectible")  # no subscription
    _status(client, samples.event("invoice.marked_uncollectible", one_off, created=T - DAY))
    assert _row(engine, user)["payment_state"] == "ok"
    assert _access(engine, user)
    of_plan = samples.invoice(customer, subscription_id=subscription["id"], status="uncollectible")
    _status(client, samples.event("invoice.marked_uncollectible", of_plan, created=T - DAY))
    assert _row(engine, user)["payment_state"] == "unpaid"
    assert not _access(engine, user)  # unpaid under a grace: the path grants nothing
    ended = {**subscription, "status": "canceled"}
    _status(client, samples.event("customer.subscription.deleted", ended, created=T))
    assert _row(engine, user)["payment_state"] == "ok"
    assert _access(engine, user)  # the entitlement summary still names 'pro'


def test_what_is_owed_since_when_and_where_to_pay(client: FlaskClient, engine: Engine) -> None:
    user, customer, subscription = _paying(client, engine)
    older = _failed(customer, subscription, at=T - 5 * DAY)
    newer = _failed(customer, subscription, at=T - 2 * DAY)
    euros = _failed(customer, subscription, at=T - 3 * DAY, currency="eur", amount_remaining=9000)
    for event in (newer, older, euros):
        _status(client, event)
    row = _row(engine, user)
    assert row["payment_failing_since"].timestamp() == T - 5 * DAY
    assert (row["amount_overdue"], row["overdue_currency"]) == (9000, "eur")  # the largest sum
    assert row["pay_url"] == older["data"]["object"]["hosted_invoice_url"]
    assert row["grace_ends_at"] is None  # no grace set
    # A paid invoice owes nothing; the earliest failure still open dates it.
    paid = {**older["data"]["object"], "status": "paid", "amount_remaining": 0}
    _status(client, samples.event("invoice.paid", paid, created=T))
    row = _row(engine, user)
    assert row["payment_failing_since"].timestamp() == T - 3 * DAY


def test_a_grace_cuts_access_at_its_end_and_a_payment_restores_it(
    client: FlaskClient, engine: Engine, database_url: str
) -> None:
    user, customer, subscription = _paying(client, engine)
    assert _access(engine, user)
    within = _failed(customer, subscription, at=T - 3 * DAY)
    _status(client, within)
    assert _access(engine, user)  # no grace: Stripe's entitlements decide

    graced = create_app(settings_for(database_url, STRIPE_PAST_DUE_GRACE="7 days"), engine).test_client()
    assert _access(engine, user)  # failing for 3 days of 7
    assert _row(engine, user)["grace_ends_at"].timestamp() == T - 3 * DAY + 7 * DAY
    past = _failed(customer, subscription, at=T - 8 * DAY)
    _status(graced, past)
    assert not _access(engine, user)  # failing for 8 days: past the grace
    for invoice in (within, past):
        paid = {**invoice["data"]["object"], "status": "paid", "amount_remaining": 0}
        _status(graced, samples.event("invoice.paid", paid, created=T))
    assert _access(engine, user)

    _status(graced, samples.event("customer.subscription.updated", {**subscription, "status": "unpaid"}, created=T))
    assert not _access(engine, user)  # unpaid: nothing to wait for
    create_app(settings_for(database_url), engine)  # started again without the setting: cleared
    assert _access(engine, user)


def test_an_organizations_standing_counts_for_its_members(
    client: FlaskClient, engine: Engine, database_url: str
) -> None:
    import uuid

    organization = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO public.organizations (id, name) VALUES (:id, 'Org')"), {"id": organization}
        )
    billing = samples.customer(metadata={"organization_id": organization})
    _status(client, samples.event("customer.created", billing, created=T - 40 * DAY))
    subscription = samples.subscription(billing["id"], status="active")
    _status(client, samples.event("customer.subscription.updated", subscription, created=T - 40 * DAY))
    summary = samples.entitlement_summary(billing["id"], ["pro"])
    _status(client, samples.event("entitlements.active_entitlement_summary.updated", summary, created=T - 40 * DAY))
    member = add_user(engine)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO public.organization_members (organization_id, user_id) VALUES (:o, :u)"),
            {"o": organization, "u": member},
        )
    graced = create_app(settings_for(database_url, STRIPE_PAST_DUE_GRACE="7d"), engine).test_client()
    assert _access(engine, member) and _row(engine, member)["payment_state"] == "ok"
    _status(graced, _failed(billing["id"], subscription, at=T - 10 * DAY))
    row = _row(engine, member)
    assert row["payment_state"] == "failing" and row["payment_failing_since"].timestamp() == T - 10 * DAY
    assert not _access(engine, member)


def test_an_invoice_sent_for_manual_payment_counts_once_its_due_date_passes(
    client: FlaskClient, engine: Engine, database_url: str
) -> None:
    """No payment attempt, a due date: nothing overdue before it; after it, failing since then,
    owed, the place to pay, and cut once the grace has passed too."""
    user, customer, subscription = _paying(client, engine)
    create_app(settings_for(database_url, STRIPE_PAST_DUE_GRACE="1 day"), engine)
    due_later = {**samples.invoice(customer, subscription_id=subscription["id"], amount=3000), "due_date": T + 5 * DAY}
    _status(client, samples.event("invoice.finalized", due_later, created=T - DAY))
    row = _row(engine, user)
    assert (row["payment_state"], row["payment_failing_since"], row["amount_overdue"]) == ("ok", None, 0)
    assert _access(engine, user)

    overdue = {**samples.invoice(customer, subscription_id=subscription["id"], amount=1000), "due_date": T - 2 * DAY}
    _status(client, samples.event("invoice.overdue", overdue, created=T - DAY))
    row = _row(engine, user)
    assert row["payment_failing_since"].timestamp() == T - 2 * DAY
    assert (row["amount_overdue"], row["overdue_currency"]) == (1000, "usd")
    assert row["pay_url"] == overdue["hosted_invoice_url"]
    assert not _access(engine, user)  # due two days ago, past a one-day grace
