"""db/supabase_shim.sql's auth functions answer as Supabase's do on a connection that has served
other requests: a setting made transaction-locally reads '' there afterwards, which means unset."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.pool import StaticPool

from tests.support import add_user

ROLES = ("anon", "authenticated", "service_role", None)  # None: the consumer's own role
READ = text("SELECT auth.uid()::text AS uid, auth.role() AS role, auth.jwt() AS jwt")


@pytest.fixture
def one_connection(database_url: str, engine: Engine) -> Iterator[Connection]:
    """A single server connection that every transaction of the test reuses, as a pooler's would."""
    single = create_engine(engine.url, poolclass=StaticPool, isolation_level="READ COMMITTED")
    with single.connect() as connection:
        yield connection
    single.dispose()


def _request(connection: Connection, role: str | None, **settings: str) -> dict[str, object]:
    """One transaction as PostgREST opens it: transaction-local settings, the role, then a read."""
    with connection.begin():
        for name, value in settings.items():
            connection.execute(text("SELECT set_config(:name, :value, true)"), {"name": name, "value": value})
        if role is not None:
            connection.execute(text(f"SET LOCAL ROLE {role}"))
        return dict(connection.execute(READ).one()._mapping)


@pytest.mark.parametrize("role", ROLES)
def test_claims_set_once_then_unset_read_as_null(one_connection: Connection, role: str | None) -> None:
    subject = str(uuid.uuid4())
    claims = {"sub": subject, "role": role or "service_role"}
    unset = {"uid": None, "role": None, "jwt": None}

    assert _request(one_connection, role) == unset  # never set on this connection
    assert _request(one_connection, role, **{"request.jwt.claims": json.dumps(claims)}) == {
        "uid": subject,
        "role": claims["role"],
        "jwt": claims,
    }
    # The setting now reads '' on this connection: unset, not a cast error.
    assert _request(one_connection, role) == unset
    assert _request(one_connection, role, **{"request.jwt.claims": ""}) == unset


@pytest.mark.parametrize("role", ROLES)
def test_older_per_claim_settings_and_the_claims_take_turns(one_connection: Connection, role: str | None) -> None:
    old_style, new_style = str(uuid.uuid4()), str(uuid.uuid4())
    older = {"request.jwt.claim.sub": old_style, "request.jwt.claim.role": "authenticated"}
    assert _request(one_connection, role, **older) == {"uid": old_style, "role": "authenticated", "jwt": None}
    # Now claim.sub and claim.role read '' and the claims document decides.
    claims = {"sub": new_style, "role": "anon"}
    assert _request(one_connection, role, **{"request.jwt.claims": json.dumps(claims)}) == {
        "uid": new_style,
        "role": "anon",
        "jwt": claims,
    }
    # And back: both kinds have been set once on this connection; the per-claim ones come first.
    assert _request(one_connection, role, **older) == {"uid": old_style, "role": "authenticated", "jwt": None}
    assert _request(one_connection, role) == {"uid": None, "role": None, "jwt": None}


def test_a_policy_on_auth_uid_works_for_the_next_request_on_the_connection(
    engine: Engine, one_connection: Connection
) -> None:
    alice, bob = add_user(engine), add_user(engine)
    with engine.connect() as connection:
        connection.execute(
            text(
                "INSERT INTO stripe_customers (stripe_customer_id, user_id) VALUES ('cus_ShimA', :a), ('cus_ShimB', :b)"
            ),
            {"a": alice, "b": bob},
        )
    own_rows = text("SELECT stripe_customer_id FROM stripe_customers ORDER BY 1")

    def rows_seen(role: str, **settings: str) -> list[str]:
        with one_connection.begin():
            for name, value in settings.items():
                one_connection.execute(text("SELECT set_config(:n, :v, true)"), {"n": name, "v": value})
            one_connection.execute(text(f"SET LOCAL ROLE {role}"))
            return list(one_connection.execute(own_rows).scalars())

    claims = {"request.jwt.claims": json.dumps({"sub": alice, "role": "authenticated"})}
    assert rows_seen("authenticated", **claims) == ["cus_ShimA"]
    # The next requests on the same connection: another user by the older setting, then nobody.
    assert rows_seen("authenticated", **{"request.jwt.claim.sub": bob}) == ["cus_ShimB"]
    assert rows_seen("anon") == []
    assert rows_seen("service_role") == ["cus_ShimA", "cus_ShimB"]
