"""Invoices: stripe_invoices, what a customer owes and whether paying it fails (the payment
standing that decides access during dunning is computed from them in SQL, db/access.sql).

Two API shapes arrive during an upgrade: since 2025-03-31 an invoice names its subscription under
`parent.subscription_details.subscription` and a line its price under
`pricing.price_details.price`; before, `subscription` and `price.id`. A payload's `lines` is a first
page: when Stripe says there is more, the rest is read (GET /v1/invoices/{id}/lines), else the
invoice is kept with the lines it has and `lines_complete` false, as entitlement sets are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from webhook.config import Keys
from webhook.objects import fields
from webhook.objects.base import BadObjectId, Reader, RemovableChange, StripeObject, listed

ID = re.compile(r"in_[a-zA-Z0-9]+")
STATUSES = {"draft", "open", "paid", "uncollectible", "void"}


@dataclass(frozen=True, kw_only=True)
class InvoiceChange(RemovableChange):
    object = "invoice"
    subscription: str | None = None
    status: str | None = None
    amount_due: int | None = None
    amount_paid: int | None = None
    amount_remaining: int | None = None
    currency: str | None = None
    attempt_count: int = 0
    next_payment_attempt: int | None = None
    due_date: int | None = None
    paid_at: int | None = None
    billing_reason: str | None = None
    hosted_invoice_url: str | None = None
    lines: list[dict[str, Any]] | None = None  # price, product, quantity, amount, period_start, period_end
    lines_complete: bool = True  # False: Stripe said there were more lines than the payload held
    # The customer must authenticate a payment (invoice.payment_action_required): True; a payment
    # event that settles it: False; anything else says nothing of it (None).
    action_required: bool | None = None
    metadata: dict[str, Any] | None = None
    note: str | None = None

    @property
    def complete(self) -> bool:
        return self.lines_complete

    def incomplete(self, why: str) -> InvoiceChange:
        return replace(self, note=f"invoice lines not complete: the payload holds a first page, and {why}")


def _line(line: dict[str, Any]) -> dict[str, Any]:
    details = fields.mapping(fields.mapping(line.get("pricing")).get("price_details"))
    price = fields.mapping(line.get("price"))
    period = fields.mapping(line.get("period"))
    return {
        "price": fields.optional_id(details.get("price")) or fields.optional_id(price.get("id")),
        "product": fields.optional_id(details.get("product")) or fields.optional_id(price.get("product")),
        "quantity": fields.integer(line.get("quantity")),
        "amount": fields.integer(line.get("amount")),
        "period_start": fields.integer(period.get("start")),
        "period_end": fields.integer(period.get("end")),
    }


def state(invoice: dict[str, Any], keys: Keys) -> InvoiceChange:
    """A full Stripe invoice, of either API shape, as the upsert it implies."""
    status = invoice.get("status")
    if status not in STATUSES:
        raise BadObjectId("the invoice has no known status")
    parent = fields.mapping(fields.mapping(invoice.get("parent")).get("subscription_details"))
    lines = fields.mapping(invoice.get("lines"))
    return InvoiceChange(
        id=fields.object_id(invoice.get("id"), ID, "in_… invoice"),
        customer_id=fields.customer_id(invoice.get("customer")),
        subscription=fields.optional_id(parent.get("subscription")) or fields.optional_id(invoice.get("subscription")),
        status=str(status),
        amount_due=fields.integer(invoice.get("amount_due")),
        amount_paid=fields.integer(invoice.get("amount_paid")),
        amount_remaining=fields.integer(invoice.get("amount_remaining")),
        currency=fields.text(invoice.get("currency")),
        attempt_count=fields.integer(invoice.get("attempt_count")) or 0,
        next_payment_attempt=fields.integer(invoice.get("next_payment_attempt")),
        due_date=fields.integer(invoice.get("due_date")),
        paid_at=fields.integer(fields.mapping(invoice.get("status_transitions")).get("paid_at")),
        billing_reason=fields.text(invoice.get("billing_reason")),
        hosted_invoice_url=fields.text(invoice.get("hosted_invoice_url")),
        lines=[_line(line) for line in lines.get("data") or [] if isinstance(line, dict)],
        lines_complete=lines.get("has_more") is not True,
        metadata=fields.mapping(invoice.get("metadata")),
    )


def gone(stripe_id: str) -> InvoiceChange:
    return InvoiceChange(id=stripe_id, customer_id="", action="delete")


def _deleted(invoice: dict[str, Any], keys: Keys) -> InvoiceChange:
    return gone(fields.object_id(invoice.get("id"), ID, "in_… invoice"))


def _payment(action_required: bool) -> Callable[[dict[str, Any], Keys], InvoiceChange]:
    def handler(invoice: dict[str, Any], keys: Keys) -> InvoiceChange:
        return replace(state(invoice, keys), action_required=action_required)

    return handler


def read(reader: Reader, stripe_id: str, keys: Keys) -> InvoiceChange:
    """The invoice with every line (a deleted draft as its deletion)."""
    found, clock = reader(f"/v1/invoices/{stripe_id}", {})
    if found.get("deleted"):
        return replace(gone(stripe_id), as_of=clock)
    change = state(found, keys)
    if not change.complete:
        every = [_line(line) for line in listed(reader, f"/v1/invoices/{stripe_id}/lines", {})]
        change = replace(change, lines=every, lines_complete=True)
    return replace(change, as_of=clock)


def list_of(reader: Reader, customer: str, keys: Keys, since: int | None = None) -> Iterator[InvoiceChange]:
    """The customer's open invoices, or with `since` every one created since then; each with every line."""
    query = {"customer": customer, **({"created": {"gte": since}} if since is not None else {"status": "open"})}
    for found in listed(reader, "/v1/invoices", query):
        change = state(found, keys)
        yield change if change.complete else read(reader, change.id, keys)


INVOICE = StripeObject(
    name="invoice",
    plural="invoices",
    id=ID,
    table="stripe_invoices",
    column="stripe_invoice_id",
    events={
        **dict.fromkeys(
            (
                "invoice.created",
                "invoice.finalized",
                "invoice.updated",
                "invoice.marked_uncollectible",
                "invoice.voided",
                "invoice.overdue",
                "invoice.will_be_due",
                "invoice.sent",
                "invoice.finalization_failed",
            ),
            state,
        ),
        "invoice.payment_action_required": _payment(True),
        **dict.fromkeys(("invoice.paid", "invoice.payment_succeeded", "invoice.payment_failed"), _payment(False)),
        "invoice.deleted": _deleted,
        # invoice.upcoming names no invoice (a preview): no handler, so it is logged as ignored.
    },
    thin=("v1.invoice.",),
    read=read,
    scope="customer",
    listing=list_of,
    compared=("status", "amount_remaining", "attempt_count", "next_payment_attempt", "due_date"),
    local_sql="SELECT stripe_invoice_id AS id, stripe_customer_id AS customer, status, amount_remaining, "
    "attempt_count, extract(epoch FROM next_payment_attempt)::bigint AS next_payment_attempt, "
    "extract(epoch FROM due_date)::bigint AS due_date FROM public.stripe_invoices WHERE status = 'open'",
    dashboard="invoices/{id}",
    gone=gone,
)
