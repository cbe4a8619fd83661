"""Customer operations for the app's own code (checkout, profile edits) and the CLI:
`ensure_customer`, `push_profile`, and the drift check behind `verify`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import stripe
from sqlalchemy import Engine

from webhook import store, stripe_api
from webhook.config import Keys
from webhook.handlers import (
    Change,
    CustomerChange,
    EntitlementsChange,
    PaymentMethodChange,
    customer_state,
    entitlement,
    payment_method_state,
    subscription_state,
)
from webhook.results import Source

DELETED_RETRIES = 3


class UnknownUser(Exception):
    """No auth.users row has this id."""


class NotLinked(Exception):
    """The user has no Stripe customer row."""


def ensure_customer(engine: Engine, client: stripe.StripeClient, user_id: str, keys: Keys) -> str:
    """The user's stripe_customer_id, creating the Stripe customer and the row when there is none.

    The idempotency key is derived from the user id, so two concurrent calls (two tabs opening
    checkout) get one Stripe customer; the per-customer lock in the database makes it one row.
    """
    with engine.connect() as connection:
        existing = store.customer_id_for_user(connection, user_id)
        if existing is not None:
            return existing
        exists, email = store.user_email(connection, user_id)
    if not exists:
        raise UnknownUser(user_id)
    key = f"ensure-customer-{user_id}"
    for _ in range(DELETED_RETRIES):
        metadata = {keys.user_id: user_id}
        customer = stripe_api.create_customer(client, email=email, metadata=metadata, idempotency_key=key)
        # Stripe replays an idempotent create's first answer for 24 hours, even when that customer
        # has been deleted since: ask for it, and make a new one (a new key) if it is gone.
        current = stripe_api.retrieve_customer(client, str(customer["id"]))
        if current is not None and not current.get("deleted"):
            break
        key = f"ensure-customer-{user_id}-after-{customer['id']}"
    else:
        raise stripe_api.StripeUnavailable("Stripe kept answering with deleted customers")
    change = customer_state(customer, keys).as_json()
    store.apply_states(engine, [change], Source.API, int(customer.get("created") or time.time()))
    with engine.connect() as connection:
        linked = store.customer_id_for_user(connection, user_id)
    # Another customer may have claimed the user meanwhile (a checkout's webhook): that one wins.
    return linked or str(customer["id"])


def push_profile(
    engine: Engine, client: stripe.StripeClient, user_id: str, *, email: str | None = None, name: str | None = None
) -> str:
    """Send a user's changed email or name to their Stripe customer. The row itself changes when
    the resulting customer.updated webhook arrives, through the normal ordered path."""
    with engine.connect() as connection:
        customer_id = store.customer_id_for_user(connection, user_id)
    if customer_id is None:
        raise NotLinked(user_id)
    changes = {key: value for key, value in (("email", email), ("name", name)) if value is not None}
    if changes:
        stripe_api.update_customer(client, customer_id, changes)
    return customer_id


class DriftKind(StrEnum):
    MISSING = "missing"  # Stripe does not know the customer
    DELETED = "deleted"  # Stripe has it as deleted
    CHANGED = "changed"  # email or name differ
    UNLINKED = "unlinked"  # a user (or organization) no customer holds while this one names it


@dataclass(frozen=True)
class Drift:
    stripe_id: str  # the customer, the subscription, or (entitlements) the customer whose set it is
    kind: DriftKind
    fields: tuple[str, ...] = ()
    stripe_state: Change | None = None
    object: str = "customer"

    @property
    def deletes(self) -> bool:
        """Fixing it deletes a row: a customer Stripe does not have (or has deleted). A subscription
        Stripe does not know is reported, never deleted: Stripe keeps canceled ones."""
        return self.object == "customer" and self.kind in (DriftKind.MISSING, DriftKind.DELETED)

    def line(self) -> str:
        detail = f" ({', '.join(self.fields)} differ)" if self.fields else ""
        what = "" if self.object == "customer" else f"{self.object} "
        return f"drift {what}{self.stripe_id}: {self.kind}{detail}"


def find_drift(
    engine: Engine,
    client: stripe.StripeClient,
    keys: Keys,
    progress: Callable[[int], None] = lambda listed: None,
) -> tuple[int, list[Drift]]:
    """Compare every local row with Stripe: (rows checked, drifts). Stripe's list is read once
    (100 a page) rather than one call per row; only rows it lacks are looked up one by one."""
    live: dict[str, dict[str, Any]] = {}
    for customer in stripe_api.list_customers(client):
        live[customer["id"]] = customer
        progress(len(live))
    with engine.connect() as connection:
        rows = store.local_customers(connection)
    drifts = []
    for customer_id, email, name in rows:
        remote = live.get(customer_id) or stripe_api.retrieve_customer(client, customer_id)
        if remote is None:
            drifts.append(Drift(customer_id, DriftKind.MISSING))
        elif remote.get("deleted"):
            drifts.append(Drift(customer_id, DriftKind.DELETED))
        else:
            differ = tuple(field for field, local in (("email", email), ("name", name)) if remote.get(field) != local)
            if differ:
                drifts.append(Drift(customer_id, DriftKind.CHANGED, differ, customer_state(remote, keys)))
    with engine.connect() as connection:
        orphans = store.relink(connection, fix=False)
    drifts.extend(Drift(customer_id, DriftKind.UNLINKED, (link,)) for link, customer_id in orphans)
    drifts += _billing_drift(engine, client, keys)
    return len(rows), drifts


def _billing_drift(engine: Engine, client: stripe.StripeClient, keys: Keys) -> list[Drift]:
    """Subscriptions (status, period end, items), entitlement sets (the same lookup keys) and the
    payment methods of customers that have some here (the same ones, with the same card summary)."""
    drifts = []
    live = {found["id"]: found for found in stripe_api.list_subscriptions(client)}
    with engine.connect() as connection:
        subscriptions = store.local_subscriptions(connection)
        sets = store.local_entitlement_sets(connection)
        methods = store.local_payment_methods(connection)
    for subscription_id, local in subscriptions.items():
        remote = live.get(subscription_id)
        if remote is None:
            drifts.append(Drift(subscription_id, DriftKind.MISSING, object="subscription"))
            continue
        state = subscription_state(remote, keys)
        differ = tuple(
            name for name in ("status", "current_period_end", "items") if getattr(state, name) != local[name]
        )
        if differ:
            drifts.append(Drift(subscription_id, DriftKind.CHANGED, differ, state, object="subscription"))
    for customer_id, local_keys in sets.items():
        active = [entitlement(item) for item in stripe_api.list_active_entitlements(client, customer_id)]
        active = [item for item in active if item["lookup_key"]]
        if sorted(item["lookup_key"] for item in active) != local_keys:
            whole = EntitlementsChange(id=customer_id, entitlements=active, complete=True)
            drifts.append(Drift(customer_id, DriftKind.CHANGED, ("entitlements",), whole, object="entitlements"))
    for customer_id, local_methods in methods.items():
        remote = {
            found["id"]: payment_method_state(found, customer_id)
            for found in stripe_api.list_payment_methods(client, customer_id)
        }
        for method_id in sorted(local_methods.keys() - remote.keys()):  # detached since: the row goes
            gone = PaymentMethodChange(id=method_id, customer="", action="delete")
            drifts.append(Drift(method_id, DriftKind.MISSING, stripe_state=gone, object="payment_method"))
        for method_id, method in sorted(remote.items()):
            if local_methods.get(method_id) != (method.brand, method.last4, method.exp_month, method.exp_year):
                drifts.append(Drift(method_id, DriftKind.CHANGED, ("card",), method, object="payment_method"))
    return drifts


class FixRefused(Exception):
    """verify --fix would do harm: the message says why, and nothing was changed."""


def deletions_plausible(rows: int, deletions: int) -> bool:
    """A key for another account or the other mode makes every row look missing in Stripe; more
    than a tenth of the rows (and more than one) going at once is taken for that."""
    return deletions <= max(1, rows // 10)


def check_mode(engine: Engine, api_key: str) -> None:
    """Refuse to apply Stripe's state read with a key of the other mode than the database's events:
    every row would look missing (and be deleted)."""
    key_livemode = "_live_" in api_key
    with engine.connect() as connection:
        modes = store.recent_livemodes(connection)
    if modes and key_livemode not in modes:
        key_mode, data_mode = ("live", "test") if key_livemode else ("test", "live")
        raise FixRefused(f"STRIPE_API_KEY is a {key_mode}-mode key but this database holds {data_mode}-mode events")


def check_fix(engine: Engine, api_key: str, rows: int, drifts: list[Drift], allow_mass_delete: bool) -> None:
    """Refuse a fix whose key is of the other mode than the database's events, or that would
    delete an implausible share of the rows (unless the operator says so)."""
    check_mode(engine, api_key)
    deletions = sum(1 for drift in drifts if drift.deletes)
    if not allow_mass_delete and not deletions_plausible(rows, deletions):
        raise FixRefused(
            f"would delete {deletions} of {rows} rows, which looks like a key for another account or mode; "
            "check STRIPE_API_KEY, or pass --allow-mass-delete to go on"
        )


def _fix_of(drift: Drift) -> Change | None:
    """What applying Stripe's state to the row means; None for an unlinked user (relinked in SQL)
    and a subscription Stripe does not know (reported only). A payment method Stripe no longer has
    attached carries its own delete."""
    return CustomerChange(action="delete", id=drift.stripe_id) if drift.deletes else drift.stripe_state


def fix_drift(engine: Engine, drifts: list[Drift], as_of: int) -> list[str]:
    """Apply Stripe's state (sync.source 'api'): changed rows take Stripe's values, rows Stripe
    no longer has are deleted (a row an event set after `as_of` is left alone), and a user left
    unlinked is linked to the newest customer that names them."""
    changes = [change.as_json() for change in map(_fix_of, drifts) if change is not None]
    outcomes = store.apply_states(engine, changes, Source.API, as_of) if changes else []
    if any(drift.kind is DriftKind.UNLINKED for drift in drifts):
        with engine.connect() as connection:
            outcomes += ["processed"] * len(store.relink(connection, fix=True))
    return outcomes


def resync(engine: Engine, client: stripe.StripeClient, api_key: str, customer_id: str, keys: Keys, actor: str) -> str:
    """Apply Stripe's current state of one customer, as `verify --fix` does for a drifted row
    (sync.source 'api'; a row an event set after the read is left alone): 'processed' or 'stale'.
    Refused (FixRefused, nothing changed) with a key of the other mode, and when Stripe does not
    know the customer at all: Stripe keeps deleted customers (`deleted: true`), so a customer the
    key cannot see at all says the key is another account's, not that the customer is gone."""
    check_mode(engine, api_key)
    as_of = int(time.time())
    remote = stripe_api.retrieve_customer(client, customer_id)
    if remote is None:
        raise FixRefused(f"Stripe does not know {customer_id} with this STRIPE_API_KEY (another account or mode?)")
    change = CustomerChange(action="delete", id=customer_id) if remote.get("deleted") else customer_state(remote, keys)
    return store.apply_states(engine, [change.as_json()], Source.API, as_of, actor)[0]
