"""Model-based: random customer histories as Stripe would produce them (same-second creates and
updates, same-second update pairs, deletions, checkouts, users deleted from auth.users; for half of
them a subscription going through its statuses, perhaps canceled, and entitlement summaries; some
billing an organization; some with payment methods attached, updated, detached), every event
possibly delivered twice, shuffled, from 10 concurrent clients to a real gunicorn with two workers,
with Postgres stopped and started in the middle. Afterwards every customer row, subscription,
entitlement set, organization link and tier, and payment method equals the model.

MODEL_CUSTOMERS sets the size (default 300, a few seconds).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.fake_stripe import FakeStripe
from tests.pgbouncer import pgbouncer
from tests.server import gunicorn, post_event
from tests.support import add_user, count, now, wait_for
from webhook import samples

CUSTOMERS = int(os.environ.get("MODEL_CUSTOMERS", "300"))


@dataclass
class History:
    customer: dict[str, Any]  # Stripe's final state of it
    events: list[dict[str, Any]] = field(default_factory=list)
    user_id: str | None = None  # the user it should end linked to
    deleted: bool = False  # by a customer.deleted event
    user_removed: bool = False  # its user deleted from auth.users during the deliveries
    subscription: dict[str, Any] | None = None  # Stripe's final state of its subscription
    entitlements: list[str] | None = None  # the lookup keys of its final entitlement summary
    organization: str | None = None  # the organization it bills
    payment_methods: list[dict[str, Any]] = field(default_factory=list)  # Stripe's final state of each
    invoices: list[dict[str, Any]] = field(default_factory=list)  # Stripe's final state of each (a draft: deleted)

    @property
    def tier(self) -> str:
        """Its organization's tier at the end: its plan's while active or trialing and the customer
        is still there, else the free tier."""
        live = self.subscription is not None and self.subscription["status"] in ("active", "trialing")
        if not live or self.deleted or self.user_removed:
            return "free"
        return str(self.subscription["items"]["data"][0]["price"]["metadata"]["tier"])  # type: ignore[index]


def _organization(engine: Engine) -> str:
    organization = str(uuid.uuid4())
    with engine.connect() as connection:
        connection.execute(
            text("INSERT INTO public.organizations (id, name) VALUES (:id, 'org')"), {"id": organization}
        )
    return organization


def _history(rng: random.Random, engine: Engine, start: int) -> History:
    user_id = add_user(engine)
    by_checkout = rng.random() < 0.2
    organization = _organization(engine) if rng.random() < 0.3 else None
    metadata = ({} if by_checkout else {"user_id": user_id}) | (
        {"organization_id": organization} if organization else {}
    )
    customer = samples.customer(created=start, name="v0", metadata=metadata)
    history = History(customer, user_id=user_id, organization=organization)
    t = start
    history.events.append(samples.event("customer.created", customer, created=t))
    if by_checkout:  # Checkout made the customer; its webhook comes two seconds after the creation
        session = samples.checkout_session(customer["id"], user_id, email="buyer@example.com", name="Buyer")
        history.events.append(samples.event("checkout.session.completed", session, created=t + 2))
    for version in range(1, rng.randint(1, 5)):
        # A share of updates in the same second as the event before (a checkout's create+update, or
        # two quick edits); some of those carry no previous_attributes, so only Stripe can order them.
        t += 0 if rng.random() < 0.3 else rng.randint(1, 3)
        previous = None if rng.random() < 0.3 else {"name": customer["name"]}
        customer = {**customer, "name": f"v{version}"}
        history.events.append(samples.event("customer.updated", customer, created=t, previous_attributes=previous))
    history.customer = customer
    if rng.random() < 0.1:
        history.deleted = True
        last = max(t, start + 2) if by_checkout else t  # Stripe deletes after the checkout completed
        history.events.append(samples.event("customer.deleted", customer, created=last + rng.randint(0, 2)))
    history.user_removed = not (history.deleted or by_checkout) and rng.random() < 0.05
    if rng.random() < 0.5:
        _billing_history(rng, history, start)
    if not history.deleted and rng.random() < 0.3:
        _payment_method_history(rng, history, start)
    if not history.deleted and rng.random() < 0.3:
        _invoice_history(rng, history, start)
    return history


def _invoice_history(rng: random.Random, history: History, start: int) -> None:
    """An invoice's life: a draft, deleted, or finalized (open) and then failing a payment attempt
    or two, then paid, voided or marked uncollectible; some steps in one second, which the types,
    previous_attributes or Stripe order."""
    invoice = samples.invoice(history.customer["id"], status="draft", lines=rng.choice((1, 2)))
    t = start + rng.randint(0, 3)
    steps = [("invoice.created", invoice, None)]
    if rng.random() < 0.15:
        steps.append(("invoice.deleted", invoice, None))
        invoice = {"id": invoice["id"], "object": "invoice", "deleted": True}
    else:
        invoice = {**invoice, "status": "open"}
        steps.append(("invoice.finalized", invoice, {"status": "draft"}))
        for attempt in range(1, rng.randint(1, 3)):
            previous = {"attempt_count": invoice["attempt_count"]}
            invoice = {**invoice, "attempt_count": attempt, "next_payment_attempt": t + 86400 * attempt}
            steps.append(("invoice.payment_failed", invoice, previous))
        end = rng.choice(("paid", "void", "uncollectible", "open"))
        if end != "open":
            previous = {"status": "open"}
            remaining = 0 if end == "paid" else invoice["amount_remaining"]
            invoice = {**invoice, "status": end, "amount_remaining": remaining, "next_payment_attempt": None}
            kind = {"paid": "invoice.paid", "void": "invoice.voided", "uncollectible": "invoice.marked_uncollectible"}
            steps.append((kind[end], invoice, previous))
    for kind, state, previous in steps:
        history.events.append(samples.event(kind, state, created=t, previous_attributes=previous))
        t += 0 if rng.random() < 0.3 else rng.randint(1, 3)
    history.invoices.append(invoice)


def _payment_method_history(rng: random.Random, history: History, start: int) -> None:
    """One or two cards attached, perhaps updated (a new expiry), perhaps detached; some of these in
    one second, which only Stripe can order."""
    for _ in range(rng.randint(1, 2)):
        method = samples.payment_method(history.customer["id"], exp_year=2030)
        t = start + rng.randint(0, 3)
        history.events.append(samples.event("payment_method.attached", method, created=t))
        if rng.random() < 0.5:
            t += rng.choice((0, 1, 2))
            method = {**method, "card": {**method["card"], "exp_year": 2031}}
            history.events.append(samples.event("payment_method.updated", method, created=t))
        if rng.random() < 0.3:
            method = {**method, "customer": None}
            history.events.append(samples.event("payment_method.detached", method, created=t + rng.choice((0, 1, 2))))
        history.payment_methods.append(method)


def _billing_history(rng: random.Random, history: History, start: int) -> None:
    """A subscription going through statuses (same-second pairs among them, some only Stripe can
    order), perhaps canceled; and entitlement summaries replacing each other."""
    customer_id = history.customer["id"]
    tier = rng.choice(("pro", "team"))
    subscription = samples.subscription(
        customer_id, status="trialing", prices=[samples.price(f"{tier}_monthly", tier=tier)]
    )
    t = start + 1
    history.events.append(samples.event("customer.subscription.created", subscription, created=t))
    # Distinct statuses: a status that comes back within one second (A, B, A) after an update
    # without previous_attributes is beyond what the rules can tell (docs/reference.md, "Event semantics").
    for status in rng.sample(["active", "past_due", "unpaid", "paused"], rng.randint(1, 3)):
        t += 0 if rng.random() < 0.3 else rng.randint(1, 3)
        previous = None if rng.random() < 0.4 else {"status": subscription["status"]}
        subscription = {**subscription, "status": status}
        history.events.append(
            samples.event("customer.subscription.updated", subscription, created=t, previous_attributes=previous)
        )
    if rng.random() < 0.2:
        subscription = {**subscription, "status": "canceled", "canceled_at": t + 1, "ended_at": t + 1}
        history.events.append(samples.event("customer.subscription.deleted", subscription, created=t + 1))
    history.subscription = subscription
    t = start + 1
    for _ in range(rng.randint(1, 3)):
        t += 0 if rng.random() < 0.2 else rng.randint(1, 3)
        keys = sorted(rng.sample(["pro", "export", "api", "seats", "sso"], rng.randint(0, 3)))
        summary = samples.entitlement_summary(customer_id, keys)
        history.events.append(samples.event("entitlements.active_entitlement_summary.updated", summary, created=t))
    history.entitlements = keys


def _deliver_until_accepted(port: int, event: dict[str, Any]) -> str:
    """As Stripe does: retry until a 2xx (here quickly, not over hours)."""
    for _ in range(300):
        try:
            status, answer = post_event(port, event, timeout=15)
        except OSError:
            status, answer = 0, {}
        if status == 200:
            return str(answer["status"])
        time.sleep(0.1)
    raise AssertionError(f"{event['id']} never accepted")


def test_random_histories_end_in_the_models_state(own_postgres: Any) -> None:
    server, engine = own_postgres
    _model_run(server, engine, str(server.get_uri()))


@pytest.mark.reliability
def test_random_histories_through_a_transaction_mode_pooler(own_postgres: Any) -> None:
    """The same, with every connection of the consumer through PgBouncer in transaction mode."""
    server, engine = own_postgres
    with pgbouncer(str(server.get_uri())) as through:
        _model_run(server, engine, through)


def _model_run(server: Any, engine: Engine, database_url: str) -> None:
    rng = random.Random(int(os.environ.get("MODEL_SEED", "9")))
    start = now() - 86_400
    histories = [_history(rng, engine, start + i * 10) for i in range(CUSTOMERS)]
    events = [event for history in histories for event in history.events]
    # The histories whose user goes: every event of theirs delivered first (a second copy of some
    # later, among the rest), then the users removed while the rest is being delivered. Each such
    # row was there and is cascaded away; nothing older brings it back.
    removed_first = [event for history in histories if history.user_removed for event in history.events]
    rng.shuffle(removed_first)
    rest = [event for history in histories if not history.user_removed for event in history.events]
    # A share of the customers also come as thin notifications (an event destination beside the
    # snapshot one, as while moving over): each reads the customer's state from Stripe.
    rest += [
        samples.thin_event("v1.customer.updated", history.customer["id"])
        for history in histories
        if not history.user_removed and rng.random() < 0.2
    ]
    rest = [event for event in rest for _ in range(rng.choice((1, 1, 2)))]
    rest += [event for event in removed_first if rng.random() < 0.5]
    rng.shuffle(rest)
    deliveries = removed_first + rest

    stripe = FakeStripe()  # holds the truth for ties only Stripe can settle
    for history in histories:
        if history.subscription is not None:
            stripe.subscriptions[history.subscription["id"]] = history.subscription
        if history.entitlements is not None:
            stripe.entitlements[history.customer["id"]] = [
                {
                    "id": f"ent_{key}",
                    "object": "entitlements.active_entitlement",
                    "feature": f"feat_{key}",
                    "lookup_key": key,
                }
                for key in history.entitlements
            ]
        for method in history.payment_methods:
            stripe.payment_methods[method["id"]] = method
        for invoice in history.invoices:
            stripe.invoices[invoice["id"]] = invoice
        if history.deleted:
            stripe.deleted.add(history.customer["id"])
        else:
            stripe.customers[history.customer["id"]] = history.customer
    outage_at = len(deliveries) // 2
    done = [0]

    def restart_midway() -> None:
        while done[0] < outage_at:
            time.sleep(0.01)
        server.stop()
        time.sleep(0.5)
        server.ensure_postgres_running()

    removed_ids = {event["id"] for event in removed_first}
    accepted: set[str] = set()

    def remove_users_midway() -> None:
        while not removed_ids <= accepted:
            time.sleep(0.01)
        with engine.connect() as connection:
            removed = [str(history.user_id) for history in histories if history.user_removed]
            connection.execute(text("DELETE FROM auth.users WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": removed})

    def deliver(event: dict[str, Any]) -> str:
        outcome = _deliver_until_accepted(port, event)
        accepted.add(event["id"])
        done[0] += 1
        return outcome

    env = {"STRIPE_API_KEY": "sk_test_fake"}
    with stripe.serving() as base, gunicorn(database_url, workers=2, STRIPE_API_BASE=base, **env) as (port, _):
        side = [threading.Thread(target=restart_midway), threading.Thread(target=remove_users_midway)]
        for thread in side:
            thread.start()
        with ThreadPoolExecutor(max_workers=10) as pool:
            outcomes = list(pool.map(deliver, deliveries))
        for thread in side:
            thread.join()
        engine.dispose()  # its connections died with the restart
        # The thin notifications were answered "queued": the server's readers apply them.
        wait_for(lambda: count(engine, "SELECT count(*) FROM stripe_thin_waiting") == 0, 60)

    with engine.connect() as connection:
        rows = {row.stripe_customer_id: row for row in connection.execute(text("SELECT * FROM stripe_customers"))}
        logged = connection.execute(text("SELECT count(*), count(DISTINCT id) FROM stripe_webhook_events")).one()
        failed = connection.execute(text("SELECT count(*) FROM stripe_webhook_events WHERE status = 'failed'")).scalar()
        statuses = dict(
            connection.execute(text("SELECT stripe_subscription_id, status FROM stripe_subscriptions")).all()
        )
        tiers = dict(connection.execute(text("SELECT id::text, subscription_tier FROM public.organizations")).all())
        methods = dict(
            connection.execute(text("SELECT stripe_payment_method_id, exp_year FROM stripe_payment_methods")).all()
        )
        invoices = {
            row[0]: tuple(row[1:])
            for row in connection.execute(
                text("SELECT stripe_invoice_id, status, attempt_count, amount_remaining FROM stripe_invoices")
            )
        }
        sets = dict(
            connection.execute(
                text(
                    "SELECT s.stripe_customer_id, coalesce(array_agg(e.lookup_key ORDER BY e.lookup_key) "
                    "FILTER (WHERE e.lookup_key IS NOT NULL), '{}') FROM stripe_entitlement_sets s "
                    "LEFT JOIN stripe_entitlements e USING (stripe_customer_id) GROUP BY 1"
                )
            ).all()
        )

    wrong = []
    thin = len({event["id"] for event in deliveries if event.get("object") == "v2.core.event"})
    for history in histories:
        customer_id, row = history.customer["id"], rows.get(history.customer["id"])
        if (
            history.subscription is not None
            and statuses.get(history.subscription["id"]) != history.subscription["status"]
        ):
            wrong.append(
                (history.subscription["id"], history.subscription["status"], statuses.get(history.subscription["id"]))
            )
        if history.entitlements is not None and list(sets.get(customer_id, [])) != history.entitlements:
            wrong.append((customer_id, history.entitlements, sets.get(customer_id)))
        if history.organization is not None and tiers[history.organization] != history.tier:
            wrong.append((history.organization, history.tier, tiers[history.organization]))
        for method in history.payment_methods:
            expected = method["card"]["exp_year"] if method["customer"] else None
            if methods.get(method["id"]) != expected:
                wrong.append((method["id"], expected, methods.get(method["id"])))
        for invoice in history.invoices:
            stated = (
                None
                if invoice.get("deleted")
                else (invoice["status"], invoice["attempt_count"], invoice["amount_remaining"])
            )
            if invoices.get(invoice["id"]) != stated:
                wrong.append((invoice["id"], stated, invoices.get(invoice["id"])))
        if history.user_removed:
            # Every event of it applied before its user went; the cascade took the row, and the
            # copies delivered afterwards are duplicates.
            if row is not None:
                wrong.append((customer_id, "should be gone with its user", row))
            continue
        if history.deleted:
            if row is not None:
                wrong.append((customer_id, "should be deleted", row))
            continue
        if row is None or row.customer_name != history.customer["name"] or str(row.user_id) != history.user_id:
            wrong.append((customer_id, history.customer["name"], row))
        elif str(row.organization_id) != str(history.organization):
            wrong.append((customer_id, history.organization, row.organization_id))
    duplicates = sum(1 for outcome in outcomes if outcome == "duplicate")
    print(
        f"\nmodel: {len(histories)} customers, {len(events)} events, {len(deliveries)} deliveries "
        f"({duplicates} duplicates, {thin} thin), {len(tiers)} organizations, {len(methods)} payment methods, "
        f"{len(wrong)} wrong"
    )
    assert wrong == []
    assert tuple(logged) == (len(events) + thin, len(events) + thin) and failed == 0
    unsettled = "SELECT count(*) FROM stripe_webhook_events WHERE status NOT IN ('processed', 'stale', 'ignored')"
    assert count(engine, unsettled) == 0
