"""Invoices, declared once in webhook/objects/invoice.py: both API shapes, lines read whole when the
payload holds a first page (or kept incomplete without a key, saying so), the invoice events and
their thin versions, a deleted draft's tombstone, invoice.upcoming ignored, ordering and ties as
for every object, and what the payment standing is computed from (failing_since, action_required)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text

from tests.fake_stripe import FakeStripe
from tests.server import gunicorn, post_event
from tests.support import KEY, deliver, event_row, now, read_waiting
from webhook import samples
from webhook.config import Settings

T = now() - 3600


def _invoice(engine: Engine, invoice_id: str) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT * FROM stripe_invoices WHERE stripe_invoice_id = :id"), {"id": invoice_id}
        ).first()
    return None if row is None else dict(row._mapping)


def _status(client: FlaskClient, event: dict[str, Any]) -> str:
    answer = deliver(client, event)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return str(answer.get_json()["status"])


@pytest.mark.parametrize("new_shape", [False, True], ids=["api before 2025-03-31", "api from 2025-03-31"])
def test_an_invoice_is_kept_from_either_api_shape(client: FlaskClient, engine: Engine, new_shape: bool) -> None:
    invoice = samples.invoice(
        "cus_Inv1", subscription_id="sub_Inv1", lines=2, new_shape=new_shape, amount=4200, attempt_count=1
    )
    invoice["due_date"] = T + 86400
    assert _status(client, samples.event("invoice.finalized", invoice, created=T)) == "processed"
    row = _invoice(engine, invoice["id"])
    assert row is not None
    assert (row["stripe_customer_id"], row["stripe_subscription_id"], row["status"]) == ("cus_Inv1", "sub_Inv1", "open")
    assert (row["amount_due"], row["amount_paid"], row["amount_remaining"], row["currency"]) == (4200, 0, 4200, "usd")
    assert (row["attempt_count"], row["billing_reason"]) == (1, "subscription_cycle")
    assert row["hosted_invoice_url"] == invoice["hosted_invoice_url"]
    assert row["next_payment_attempt"].timestamp() == invoice["next_payment_attempt"]
    assert row["due_date"].timestamp() == T + 86400 and row["paid_at"] is None
    period = invoice["lines"]["data"][0]["period"]
    assert row["lines"] == [
        {
            "price": f"price_line{n}",
            "product": "prod_plan",
            "quantity": 1,
            "amount": 2100,
            "period_start": period["start"],
            "period_end": period["end"],
        }
        for n in range(2)
    ]
    assert row["lines_complete"] is True
    assert row["invoice_metadata"]["sync"]["event_created"] == T


def test_both_api_versions_mid_upgrade_keep_one_row(client: FlaskClient, engine: Engine) -> None:
    """Events of one invoice from both sides of the 2025-03-31 upgrade, in either order: each reads
    its own shape, and the newest wins as for any object."""
    old = samples.invoice("cus_Inv8", subscription_id="sub_Inv8", new_shape=False)
    new = samples.invoice("cus_Inv8", old["id"], subscription_id="sub_Inv8", new_shape=True, attempt_count=1)
    assert _status(client, samples.event("invoice.payment_failed", new, created=T + 10)) == "processed"
    assert _status(client, samples.event("invoice.finalized", old, created=T)) == "stale"
    paid = {**old, "status": "paid", "amount_remaining": 0}
    assert _status(client, samples.event("invoice.paid", paid, created=T + 20)) == "processed"
    row = _invoice(engine, old["id"])
    assert row is not None and (row["status"], row["stripe_subscription_id"]) == ("paid", "sub_Inv8")
    assert [line["price"] for line in row["lines"]] == ["price_line0"]


@pytest.mark.parametrize("served", ["in process", "under gunicorn"])
def test_13_lines_are_read_whole_with_a_key(
    served: str, keyed: FlaskClient, stripe_http: str, fake: FakeStripe, engine: Engine, database_url: str
) -> None:
    """Under gunicorn the delivery takes the server's own path (process_delivery, from the event
    loop), which hands a change it must complete to a delivery thread."""
    invoice = samples.invoice(f"cus_Inv2{served[0]}", lines=13, page=10)  # Stripe's payload: 10 lines, has_more
    fake.invoices[invoice["id"]] = invoice
    fake.invoice_lines[invoice["id"]] = samples.invoice(invoice["customer"], invoice["id"], lines=13, page=13)["lines"][
        "data"
    ]
    event = samples.event("invoice.finalized", invoice, created=T)
    if served == "in process":
        assert _status(keyed, event) == "processed"
    else:
        with gunicorn(database_url, workers=1, STRIPE_API_KEY=KEY, STRIPE_API_BASE=stripe_http) as (port, _):
            assert post_event(port, event) == (200, {"event_id": event["id"], "status": "processed"})
    row = _invoice(engine, invoice["id"])
    assert row is not None and row["lines_complete"] is True
    assert [line["price"] for line in row["lines"]] == [f"price_line{n}" for n in range(13)]
    assert ("GET", f"/v1/invoices/{invoice['id']}/lines") in fake.requests


def test_without_a_key_the_first_page_is_kept_and_said_incomplete(client: FlaskClient, engine: Engine) -> None:
    invoice = samples.invoice("cus_Inv3", lines=13, page=10)
    assert _status(client, samples.event("invoice.finalized", invoice, created=T)) == "processed"
    row = _invoice(engine, invoice["id"])
    assert row is not None and row["lines_complete"] is False and len(row["lines"]) == 10
    assert "no API key" in row["invoice_metadata"]["sync"]["note"]


def test_a_deleted_draft_leaves_a_tombstone_and_an_older_event_stays_out(client: FlaskClient, engine: Engine) -> None:
    draft = samples.invoice("cus_Inv4", status="draft")
    assert _status(client, samples.event("invoice.created", draft, created=T)) == "processed"
    assert _status(client, samples.event("invoice.deleted", draft, created=T + 5)) == "processed"
    assert _invoice(engine, draft["id"]) is None
    assert _status(client, samples.event("invoice.updated", draft, created=T + 4)) == "stale"
    assert _invoice(engine, draft["id"]) is None
    with engine.connect() as connection:
        buried = connection.execute(
            text("SELECT event_created FROM stripe_object_tombstones WHERE object = 'invoice' AND stripe_id = :id"),
            {"id": draft["id"]},
        ).scalar_one()
    assert buried == T + 5


def test_invoice_upcoming_is_ignored(client: FlaskClient, engine: Engine) -> None:
    upcoming = {**samples.invoice("cus_Inv5"), "id": None}  # a preview: no invoice id
    event = samples.event("invoice.upcoming", upcoming, created=T)
    assert _status(client, event) == "ignored"
    assert event_row(engine, event["id"])["status"] == "ignored"  # type: ignore[index]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM stripe_invoices")).scalar_one() == 0


def test_order_failing_since_and_action_required(client: FlaskClient, engine: Engine) -> None:
    invoice = samples.invoice("cus_Inv6", subscription_id="sub_Inv6")
    failed = {**invoice, "attempt_count": 1}
    paid = {
        **invoice,
        "status": "paid",
        "amount_remaining": 0,
        "attempt_count": 2,
        "status_transitions": {"paid_at": T + 20},
    }
    assert _status(client, samples.event("invoice.payment_failed", failed, created=T + 10)) == "processed"
    assert _invoice(engine, invoice["id"])["failing_since"].timestamp() == T + 10  # type: ignore[index]
    assert _status(client, samples.event("invoice.payment_action_required", failed, created=T + 12)) == "processed"
    assert _invoice(engine, invoice["id"])["action_required"] is True  # type: ignore[index]
    # An older event delivered late is stale; the failure is still dated from the first one seen...
    assert _status(client, samples.event("invoice.finalized", invoice, created=T + 5)) == "stale"
    assert _invoice(engine, invoice["id"])["failing_since"].timestamp() == T + 10  # type: ignore[index]
    # ... unless it is an older failure: then the payment was failing since then.
    assert _status(client, samples.event("invoice.payment_failed", failed, created=T + 7)) == "stale"
    assert _invoice(engine, invoice["id"])["failing_since"].timestamp() == T + 7  # type: ignore[index]
    assert _status(client, samples.event("invoice.paid", paid, created=T + 20)) == "processed"
    row = _invoice(engine, invoice["id"])
    assert row is not None and (row["status"], row["amount_remaining"], row["action_required"]) == ("paid", 0, False)
    assert row["failing_since"] is None and row["paid_at"].timestamp() == T + 20


def test_a_thin_invoice_notification_reads_the_invoice(
    keyed: FlaskClient, fake: FakeStripe, engine: Engine, keyed_settings: Settings
) -> None:
    invoice = samples.invoice("cus_Inv7", status="paid")
    fake.invoices[invoice["id"]] = invoice
    notification = samples.thin_event("v1.invoice.paid", invoice["id"])
    answer = deliver(keyed, notification)
    assert answer.get_json()["status"] == "queued"
    assert read_waiting(engine, keyed_settings) == 1
    row = _invoice(engine, invoice["id"])
    assert row is not None and row["status"] == "paid"
    assert row["invoice_metadata"]["sync"]["source"] == "thin"


def test_backfill_and_verify_cover_open_invoices(engine: Engine, database_url: str) -> None:
    from tests.support import SECRET, cli

    fake = FakeStripe()
    customer = fake.add_customer()
    subscription = samples.subscription(customer["id"], status="past_due")
    fake.subscriptions[subscription["id"]] = subscription
    invoice = samples.invoice(customer["id"], subscription_id=subscription["id"], attempt_count=1, lines=13)
    fake.invoices[invoice["id"]] = invoice
    every = samples.invoice(customer["id"], invoice["id"], lines=13, page=13)["lines"]["data"]
    fake.invoice_lines[invoice["id"]] = every
    with fake.serving() as base:
        env = {"DATABASE_URL": database_url, "STRIPE_WEBHOOK_SECRET": SECRET, "STRIPE_API_BASE": base}
        env["STRIPE_API_KEY"] = "sk_test_fake"
        backfilled = cli("backfill", **env)
        assert backfilled.returncode == 0, backfilled.stderr
        assert "1 invoices" in backfilled.stdout
        row = _invoice(engine, invoice["id"])
        assert row is not None and row["attempt_count"] == 1 and len(row["lines"]) == 13 and row["lines_complete"]
        assert cli("verify", **env).returncode == 0

        # Stripe retried the payment again and no webhook came: verify finds it, --fix applies it.
        fake.invoices[invoice["id"]] = {**invoice, "attempt_count": 2, "next_payment_attempt": now() + 86400}
        drifted = cli("verify", **env)
        assert drifted.returncode == 1
        assert f"drift invoice {invoice['id']}: changed (attempt_count, next_payment_attempt differ)" in drifted.stdout
        assert cli("verify", "--fix", **env).returncode == 0
        assert _invoice(engine, invoice["id"])["attempt_count"] == 2  # type: ignore[index]

        # Paid since, and the listing of open invoices no longer has it: read by itself, changed.
        fake.invoices[invoice["id"]] = {**invoice, "status": "paid", "amount_remaining": 0, "attempt_count": 2}
        paid = cli("verify", **env)
        assert f"drift invoice {invoice['id']}: changed (status, amount_remaining" in paid.stdout
        assert cli("verify", "--fix", **env).returncode == 0
        assert _invoice(engine, invoice["id"])["status"] == "paid"  # type: ignore[index]

        # Open invoices only, by default; every one since a day with --invoices-since.
        old = {**samples.invoice(customer["id"], status="paid"), "created": now() - 40 * 86400}
        older = {**samples.invoice(customer["id"], status="paid"), "created": now() - 400 * 86400}
        fake.invoices.update({old["id"]: old, older["id"]: older})
        assert cli("backfill", **env).returncode == 0 and _invoice(engine, old["id"]) is None
        since = time.strftime("%Y-%m-%d", time.gmtime(now() - 100 * 86400))
        assert cli("backfill", "--invoices-since", since, **env).returncode == 0
        assert _invoice(engine, old["id"]) is not None and _invoice(engine, older["id"]) is None
        refused = cli("backfill", "--invoices-since", "last week", **env)
        assert refused.returncode == 2 and "is not a day like" in refused.stderr
