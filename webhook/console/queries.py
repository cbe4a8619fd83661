"""The support console's SQL: lookups by each kind of key, one customer's row, events and audit
(each an index scan: see tests/test_console.py for the plans), the failed events, the sessions,
and the count of sign-in attempts that slows guessing down on every worker and host alike. Run on
the console's own pool (database.side_engine), every statement bounded."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

from webhook import objects_store

TIMELINE_LIMIT = 200


def _all(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(text(sql), params)]


def _one(engine: Engine, sql: str, **params: Any) -> dict[str, Any] | None:
    rows = _all(engine, sql, **params)
    return rows[0] if rows else None


CUSTOMER_COLUMNS = (
    "stripe_customer_id, customer_email, customer_name, user_id, organization_id, updated_at, customer_metadata"
)


def customers_by_email(engine: Engine, email: str) -> list[dict[str, Any]]:
    return _all(
        engine,
        f"SELECT {CUSTOMER_COLUMNS} FROM stripe_customers WHERE lower(customer_email) = lower(:email) "
        "ORDER BY updated_at DESC LIMIT 50",
        email=email,
    )


def users_by_email(engine: Engine, email: str) -> list[dict[str, Any]]:
    # auth.users has no index on lower(email) (Supabase's is on email itself): a scan, bounded by the
    # console's statement timeout; support looks people up one at a time.
    return _all(engine, "SELECT id, email FROM auth.users WHERE lower(email) = lower(:email) LIMIT 50", email=email)


def user(engine: Engine, user_id: str) -> dict[str, Any] | None:
    with engine.connect() as connection:
        return objects_store.user(connection, user_id)


def customer_of_user(engine: Engine, user_id: str) -> str | None:
    with engine.connect() as connection:
        return objects_store.customer_of_user(connection, user_id)


def claims_of_user(engine: Engine, user_id: str) -> list[str]:
    rows = _all(engine, "SELECT stripe_customer_id FROM stripe_customer_claims WHERE user_id = :id", id=user_id)
    return [str(row["stripe_customer_id"]) for row in rows]


# The app's organizations, when migrate linked them (stripe_organizations_on): its name column is
# not the consumer's to rely on, so it is read from the row as JSON.
_ORGANIZATION = (
    "SELECT o.id, to_jsonb(o) ->> 'name' AS name, o.subscription_tier, c.stripe_customer_id, "
    "(SELECT count(*) FROM public.organization_members m WHERE m.organization_id = o.id) AS members "
    "FROM public.organizations o LEFT JOIN stripe_customers c ON c.organization_id = o.id "
)


def organization(engine: Engine, organization_id: str) -> dict[str, Any] | None:
    return _one(engine, _ORGANIZATION + "WHERE o.id = :id", id=organization_id)


def organizations_of_user(engine: Engine, user_id: str) -> list[dict[str, Any]]:
    """The organizations a user is a member of, each with its billing customer (or none)."""
    if not _one(engine, "SELECT stripe_organizations_on() AS on")["on"]:  # type: ignore[index]
        return []
    return _all(
        engine,
        _ORGANIZATION + "WHERE o.id IN (SELECT organization_id FROM public.organization_members WHERE user_id = :id) "
        "ORDER BY c.stripe_customer_id IS NULL, o.id LIMIT 20",
        id=user_id,
    )


def event(engine: Engine, event_id: str) -> dict[str, Any] | None:
    return _one(
        engine,
        "SELECT id, type, created, status, attempts, last_error, livemode, stripe_customer_id "
        "FROM stripe_webhook_events WHERE id = :id",
        id=event_id,
    )


def customer(engine: Engine, customer_id: str) -> dict[str, Any] | None:
    return _one(
        engine,
        f"SELECT {CUSTOMER_COLUMNS}, default_payment_method, created_at FROM stripe_customers "
        "WHERE stripe_customer_id = :id",
        id=customer_id,
    )


def tombstone(engine: Engine, customer_id: str) -> dict[str, Any] | None:
    return _one(
        engine,
        "SELECT event_id, event_created, deleted_at FROM stripe_object_tombstones "
        "WHERE object = 'customer' AND stripe_id = :id",
        id=customer_id,
    )


EVENTS_OF = (
    "SELECT id, type, created, status, attempts, last_error, livemode, received_at FROM stripe_webhook_events "
    "WHERE stripe_customer_id = :id ORDER BY created DESC LIMIT :limit"
)
# Every object's changes are in the one audit, under the customer they belong to.
AUDIT_OF = (
    "SELECT object, coalesce(stripe_id, stripe_customer_id) AS stripe_id, operation, old_row, new_row, event_id, "
    "changed_by, changed_at FROM stripe_customers_audit WHERE stripe_customer_id = :id "
    "ORDER BY changed_at DESC LIMIT :limit"
)


def events_of(engine: Engine, customer_id: str) -> list[dict[str, Any]]:
    return _all(engine, EVENTS_OF, id=customer_id, limit=TIMELINE_LIMIT)


def audit_of(engine: Engine, customer_id: str) -> list[dict[str, Any]]:
    return _all(engine, AUDIT_OF, id=customer_id, limit=TIMELINE_LIMIT)


def subscriptions_of(engine: Engine, customer_id: str) -> list[dict[str, Any]]:
    return _all(
        engine,
        "SELECT stripe_subscription_id, status, items, current_period_end, cancel_at_period_end, canceled_at, "
        "ended_at, trial_end FROM stripe_subscriptions WHERE stripe_customer_id = :id "
        "ORDER BY current_period_end DESC NULLS LAST LIMIT 50",
        id=customer_id,
    )


def entitlements_of(engine: Engine, customer_id: str) -> tuple[list[str], dict[str, Any] | None]:
    """The customer's active entitlement lookup keys, and its set's row (None: never synced)."""
    keys = _all(
        engine,
        "SELECT lookup_key FROM stripe_entitlements WHERE stripe_customer_id = :id ORDER BY lookup_key LIMIT 200",
        id=customer_id,
    )
    found = _one(
        engine,
        "SELECT complete, entitlements_metadata -> 'sync' AS sync FROM stripe_entitlement_sets "
        "WHERE stripe_customer_id = :id",
        id=customer_id,
    )
    return [str(row["lookup_key"]) for row in keys], found


def invoices_of(engine: Engine, customer_id: str) -> list[dict[str, Any]]:
    """The customer's open invoices, then the most recent others (by its index on the customer)."""
    return _all(
        engine,
        "SELECT stripe_invoice_id, status, amount_due, amount_remaining, currency, attempt_count, "
        "next_payment_attempt, hosted_invoice_url, failing_since, due_date, action_required FROM stripe_invoices "
        "WHERE stripe_customer_id = :id ORDER BY status = 'open' DESC, created_at DESC LIMIT 20",
        id=customer_id,
    )


def payment_methods_of(engine: Engine, customer_id: str) -> list[dict[str, Any]]:
    return _all(
        engine,
        "SELECT stripe_payment_method_id, type, brand, last4, exp_month, exp_year FROM stripe_payment_methods "
        "WHERE stripe_customer_id = :id ORDER BY stripe_payment_method_id LIMIT 50",
        id=customer_id,
    )


def failed_events(engine: Engine) -> list[dict[str, Any]]:
    return _all(
        engine,
        "SELECT id, type, created, attempts, last_error, received_at, stripe_customer_id FROM stripe_webhook_events "
        "WHERE status = 'failed' ORDER BY received_at LIMIT 500",
    )


# Sign-in attempts per name, in the database so that every worker and host counts the same ones,
# taken before the password is checked: one statement, so parallel guesses each get their own
# number and at most MAX of them are checked. A window starts at its first attempt.
_SIGNIN_ATTEMPT = text(
    """
    INSERT INTO stripe_support_signins AS s (name, attempts) VALUES (:name, 1)
    ON CONFLICT (name) DO UPDATE SET
      attempts = CASE WHEN s.window_started < now() - make_interval(secs => :window) THEN 1 ELSE s.attempts + 1 END,
      window_started = CASE WHEN s.window_started < now() - make_interval(secs => :window)
        THEN now() ELSE s.window_started END
    RETURNING attempts
    """
)


def count_signin_attempt(engine: Engine, name: str, window_seconds: int) -> int:
    """This attempt's number in the name's current window."""
    with engine.connect() as connection:
        return int(connection.execute(_SIGNIN_ATTEMPT, {"name": name, "window": window_seconds}).scalar_one())


def clear_signin_attempts(engine: Engine, name: str) -> None:
    with engine.connect() as connection:
        connection.execute(text("DELETE FROM stripe_support_signins WHERE name = :name"), {"name": name})


def open_session(engine: Engine, token_hash: str, name: str, seconds: int) -> None:
    """A signed-in session, valid for `seconds`; expired ones are cleared on the way."""
    with engine.connect() as connection:
        connection.execute(
            text(
                "DELETE FROM stripe_support_sessions WHERE expires_at < now();"
                "INSERT INTO stripe_support_sessions (token_hash, name, expires_at) "
                "VALUES (:hash, :name, now() + make_interval(secs => :seconds))"
            ),
            {"hash": token_hash, "name": name, "seconds": seconds},
        )


def session_open(engine: Engine, token_hash: str, name: str) -> bool:
    found = _one(
        engine,
        "SELECT 1 AS open FROM stripe_support_sessions "
        "WHERE token_hash = :hash AND name = :name AND expires_at > now()",
        hash=token_hash,
        name=name,
    )
    return found is not None


def close_session(engine: Engine, token_hash: str) -> None:
    with engine.connect() as connection:
        connection.execute(text("DELETE FROM stripe_support_sessions WHERE token_hash = :hash"), {"hash": token_hash})
