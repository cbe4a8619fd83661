"""Customer operations for the app's own code (checkout, profile edits) and the CLI:
`ensure_customer` and `push_profile`."""

from __future__ import annotations

import time

import stripe
from sqlalchemy import Engine

from webhook import objects_store, stripe_api
from webhook.config import Keys
from webhook.objects import customer
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
        existing = objects_store.customer_of_user(connection, user_id)
        if existing is not None:
            return existing
        found = objects_store.user(connection, user_id)
    if found is None:
        raise UnknownUser(user_id)
    email = found["email"]
    key = f"ensure-customer-{user_id}"
    for _ in range(DELETED_RETRIES):
        metadata = {keys.user_id: user_id}
        created = stripe_api.create_customer(client, email=email, metadata=metadata, idempotency_key=key)
        # Stripe replays an idempotent create's first answer for 24 hours, even when that customer
        # has been deleted since: ask for it, and make a new one (a new key) if it is gone.
        current = customer.CUSTOMER.read_known(stripe_api.reader(client), str(created["id"]), keys)
        if current is not None and not current.deletes:
            break
        key = f"ensure-customer-{user_id}-after-{created['id']}"
    else:
        raise stripe_api.StripeUnavailable("Stripe kept answering with deleted customers")
    change = customer.state(created, keys).as_json()
    objects_store.apply_states(engine, [change], Source.API, int(created.get("created") or time.time()))
    with engine.connect() as connection:
        linked = objects_store.customer_of_user(connection, user_id)
    # Another customer may have claimed the user meanwhile (a checkout's webhook): that one wins.
    return linked or str(created["id"])


def push_profile(
    engine: Engine, client: stripe.StripeClient, user_id: str, *, email: str | None = None, name: str | None = None
) -> str:
    """Send a user's changed email or name to their Stripe customer. The row itself changes when
    the resulting customer.updated webhook arrives, through the normal ordered path."""
    with engine.connect() as connection:
        customer_id = objects_store.customer_of_user(connection, user_id)
    if customer_id is None:
        raise NotLinked(user_id)
    changes = {key: value for key, value in (("email", email), ("name", name)) if value is not None}
    if changes:
        stripe_api.update_customer(client, customer_id, changes)
    return customer_id
