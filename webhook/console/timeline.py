"""What the customer page says, in words a support person understands: the row's state, and one
timeline of its events and audit rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from webhook.objects.customer import CUSTOMER

# The audit's rows are whole table rows; these are the parts a person reads.
FIELDS = {
    "customer_email": "email",
    "customer_name": "name",
    "default_payment_method": "payment method",
    "user_id": "user",
    "organization_id": "organization",
}


@dataclass(frozen=True)
class State:
    headline: str
    note: str | None
    alarming: bool


def state_of(
    row: dict[str, Any] | None,
    user: dict[str, Any] | None,
    tombstone: dict[str, Any] | None,
    organization: dict[str, Any] | None = None,
) -> State:
    if row is None:
        if tombstone:
            return State("Deleted in Stripe, or removed from the table", None, True)
        return State("No row for this customer", "nothing has arrived from Stripe about it", True)
    sync = (row.get("customer_metadata") or {}).get("sync") or {}
    note = sync.get("note")
    unlinked = sync.get("status") == "unlinked"
    if organization is not None:
        bills = f"Bills organization {organization.get('name') or organization['id']}"
        if row.get("user_id") is None:
            return State(bills, note, unlinked)
        bills += " and "
    else:
        bills = ""
    if row.get("user_id") is None:
        return State("Not linked to any user", note or "the customer names no user", True)
    who = user["email"] if user and user.get("email") else str(row["user_id"])
    if note and note.startswith("tie not settled"):
        return State(f"{bills}Linked to {who}", f"{note}: the order of two same-second events could not be told", True)
    return State(f"{bills}Linked to {who}", note, unlinked)


# Best first, as stripe_user_billing ranks a user's subscriptions.
PLAN_RANK = ["active", "trialing", "past_due", "unpaid", "paused", "incomplete", "canceled", "incomplete_expired"]


def _day(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d") if value else "?"


def access_of(
    row: dict[str, Any] | None,
    subscriptions: list[dict[str, Any]],
    entitlements: list[str],
    entitlement_set: dict[str, Any] | None,
    has_api_key: bool,
) -> State:
    """Whether the customer's user (or its organization's members) have access, and if not, why,
    in words."""
    if row is None or (row.get("user_id") is None and row.get("organization_id") is None):
        reason = "no customer row" if row is None else "the customer is linked to no user or organization"
        return State("No access through this customer", reason, True)
    ranked = sorted(subscriptions, key=lambda found: PLAN_RANK.index(found["status"]))
    best = ranked[0] if ranked else None
    if best is None:
        plan = "no subscription"
    elif best["status"] in ("active", "trialing"):
        plan = (
            f"{best['status']} subscription {best['stripe_subscription_id']} until {_day(best['current_period_end'])}"
        )
    else:
        ended = best.get("canceled_at") or best.get("ended_at")
        when = f" on {_day(ended)}" if ended and best["status"] == "canceled" else ""
        plan = f"no active subscription: {best['stripe_subscription_id']} {best['status']}{when}"
    if entitlement_set is None:
        why = "no API key" if not has_api_key else "no entitlement summary has arrived from Stripe"
        return State("No entitlements", f"{plan}; entitlements not synced: {why}", True)
    if not entitlement_set.get("complete", True):
        note = (entitlement_set.get("sync") or {}).get("note") or "more than the summary listed"
        return State(f"Access to: {', '.join(entitlements) or 'nothing'}", f"{plan}; {note}", True)
    if not entitlements:
        return State("No access: no active entitlements", plan, True)
    return State(f"Access to: {', '.join(entitlements)}", plan, False)


def with_standing(state: State, invoices: list[dict[str, Any]], grace_seconds: int | None) -> State:
    """The access state, with what its open invoices say of it in words: a payment failing (since
    when, how many attempts, the next one) and, under STRIPE_PAST_DUE_GRACE, when access ends or
    ended; or a payment waiting for the customer's authentication."""
    open_ones = [invoice for invoice in invoices if invoice["status"] == "open"]
    failing = sorted(
        (invoice for invoice in open_ones if invoice["failing_since"] and invoice["attempt_count"]),
        key=lambda invoice: invoice["failing_since"],
    )
    words = []
    if failing:
        first = failing[0]
        next_try = f", next {_day(first['next_payment_attempt'])}" if first["next_payment_attempt"] else ""
        since, attempts = _day(first["failing_since"]), first["attempt_count"]
        words.append(f"payment failing since {since} ({attempts} attempts{next_try})")
        if grace_seconds is not None:
            ends = first["failing_since"] + timedelta(seconds=grace_seconds)
            verb = "ended" if ends <= datetime.now(ends.tzinfo) else "ends"
            words.append(f"access {verb} {_day(ends)} under a {_span(grace_seconds)} grace")
    if any(invoice["action_required"] for invoice in open_ones):
        words.append("a payment waits for the customer's authentication")
    if not words:
        return state
    return State(state.headline, "; ".join(filter(None, [state.note, *words])), True)


def _span(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{days}-day" if not rest else f"{seconds // 3600}-hour" if not seconds % 3600 else f"{seconds}-second"


def dashboard_url(customer_id: str, livemode: bool) -> str:
    return CUSTOMER.dashboard_url(customer_id, customer_id, livemode)


@dataclass
class Entry:
    at: datetime
    what: str  # "event" or "change"
    title: str
    outcome: str = ""
    alarming: bool = False
    event_id: str | None = None
    attempts: int | None = None
    error: str | None = None
    changes: list[tuple[str, str, str]] = field(default_factory=list)
    by: str = ""


def _shown(value: Any) -> str:
    if value in (None, "", {}):
        return "—"
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)


def changes_of(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(field, from, to) for each readable field that differs."""
    old, new = old or {}, new or {}
    found = [
        (label, _shown(old.get(column)), _shown(new.get(column)))
        for column, label in FIELDS.items()
        if _shown(old.get(column)) != _shown(new.get(column))
    ]
    old_sync = (old.get("customer_metadata") or {}).get("sync") or {}
    new_sync = (new.get("customer_metadata") or {}).get("sync") or {}
    for key in ("status", "note"):
        if _shown(old_sync.get(key)) != _shown(new_sync.get(key)):
            found.append((f"sync {key}", _shown(old_sync.get(key)), _shown(new_sync.get(key))))
    old_meta = (old.get("customer_metadata") or {}).get("stripe")
    new_meta = (new.get("customer_metadata") or {}).get("stripe")
    if _shown(old_meta) != _shown(new_meta):  # a new row's {} is no change from nothing
        found.append(("Stripe metadata", _shown(old_meta), _shown(new_meta)))
    return found


BILLING_FIELDS = {
    "subscription_tier": "tier",
    "status": "status",
    "current_period_end": "period end",
    "cancel_at_period_end": "cancels at period end",
    "feature": "feature",
}


def billing_changes_of(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    old, new = old or {}, new or {}
    found = [
        (label, _shown(old.get(column)), _shown(new.get(column)))
        for column, label in BILLING_FIELDS.items()
        if old.get(column) != new.get(column)
    ]
    old_prices = [item.get("lookup_key") or item.get("price") for item in old.get("items") or []]
    new_prices = [item.get("lookup_key") or item.get("price") for item in new.get("items") or []]
    if old_prices != new_prices:
        found.append(("items", _shown(old_prices), _shown(new_prices)))
    return found


def timeline(events: list[dict[str, Any]], audit: list[dict[str, Any]]) -> list[Entry]:
    entries = [
        Entry(
            at=event["created"],
            what="event",
            title=event["type"],
            # A thin notification answered "queued" is received until its read settles it.
            outcome="waiting" if event["status"] == "received" else event["status"],
            alarming=event["status"] == "failed",
            event_id=event["id"],
            attempts=event["attempts"],
            error=event["last_error"],
        )
        for event in events
    ]
    for change in audit:
        actor = change["changed_by"] or ""
        person = actor.removeprefix("support:") if actor.startswith("support:") else None
        if change["event_id"]:
            by = f"event {change['event_id']}" + (f", replayed by {person}" if person else "")
        else:
            by = f"{person} (support)" if person else actor
        if change["object"] == CUSTOMER.name:  # the page's own row
            title = {"INSERT": "row created", "UPDATE": "row changed", "DELETE": "row deleted"}[change["operation"]]
            alarming, changes = change["operation"] == "DELETE", changes_of(change["old_row"], change["new_row"])
        else:
            verb = {"INSERT": "added", "UPDATE": "changed", "DELETE": "removed"}[change["operation"]]
            title = f"{change['object']} {change['stripe_id']} {verb}"
            alarming = change["operation"] == "DELETE" and change["object"] == "subscription"
            changes = billing_changes_of(change["old_row"], change["new_row"])
        entries.append(
            Entry(
                at=change["changed_at"],
                what="change",
                title=title,
                alarming=alarming,
                event_id=change["event_id"],
                changes=changes,
                by=by,
            )
        )
    return sorted(entries, key=lambda entry: entry.at, reverse=True)
