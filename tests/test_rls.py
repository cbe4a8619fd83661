"""Row level security with Supabase's role semantics (from the shim): a user sees exactly their own
customer row and can change nothing; anon sees nothing; service_role does everything."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from tests.support import add_user
from webhook import database, migrations

TABLES = (
    "stripe_customers",
    "stripe_webhook_events",
    "stripe_customers_audit",
    "stripe_customer_claims",
    "stripe_organization_claims",
    "stripe_sync_cursors",
    "stripe_support_sessions",
    "stripe_support_signins",
    "stripe_subscriptions",
    "stripe_payment_methods",
    "stripe_invoices",
    "stripe_settings",
    "stripe_entitlements",
    "stripe_entitlement_sets",
    "stripe_object_tombstones",
    "stripe_thin_waiting",
    "stripe_api_budget",
)


@contextmanager
def acting_as(engine: Engine, role: str, user_id: str | None = None) -> Iterator[Connection]:
    """A transaction as PostgREST opens it for a request: the JWT's claims, then the role."""
    claims = {"role": role, **({"sub": user_id} if user_id else {})}
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="READ COMMITTED")
        transaction = connection.begin()
        try:
            connection.execute(text("SELECT set_config('request.jwt.claims', :c, true)"), {"c": json.dumps(claims)})
            connection.execute(text(f"SET LOCAL ROLE {role}"))
            yield connection
        finally:
            transaction.rollback()


@pytest.fixture
def two_customers(engine: Engine) -> tuple[str, str]:
    alice, bob = add_user(engine), add_user(engine)
    with engine.connect() as connection:
        connection.execute(
            text(
                "INSERT INTO stripe_customers (stripe_customer_id, user_id, customer_email) "
                "VALUES ('cus_Alice', :a, 'alice@example.com'), ('cus_Bob', :b, 'bob@example.com'), "
                "('cus_Nobody', NULL, 'nobody@example.com')"
            ),
            {"a": alice, "b": bob},
        )
        connection.execute(
            text(
                "INSERT INTO stripe_webhook_events (id, type, created, payload, status) "
                "VALUES ('evt_1', 'customer.created', now(), '{}', 'processed')"
            )
        )
    return alice, bob


def _refused(connection: Connection, statement: str) -> bool:
    try:
        with connection.begin_nested():
            connection.execute(text(statement))
    except DBAPIError as error:
        return "permission denied" in str(error) or "row-level security" in str(error)
    return False


def test_a_user_sees_exactly_their_own_row(engine: Engine, two_customers: tuple[str, str]) -> None:
    alice, _ = two_customers
    with acting_as(engine, "authenticated", alice) as connection:
        rows = connection.execute(text("SELECT stripe_customer_id FROM stripe_customers")).scalars().all()
        assert rows == ["cus_Alice"]
        assert _refused(connection, "SELECT * FROM stripe_webhook_events")
        assert _refused(connection, "SELECT * FROM stripe_customers_audit")


def test_a_user_can_change_nothing(engine: Engine, two_customers: tuple[str, str]) -> None:
    alice, _ = two_customers
    with acting_as(engine, "authenticated", alice) as connection:
        # No write privilege at all: TRUNCATE would ignore row level security and skip the audit.
        for statement in (
            "INSERT INTO stripe_customers (stripe_customer_id) VALUES ('cus_Mine')",
            "UPDATE stripe_customers SET customer_email = 'evil@example.com'",
            "UPDATE stripe_customers SET user_id = auth.uid() WHERE stripe_customer_id = 'cus_Nobody'",
            "DELETE FROM stripe_customers",
            *(f"TRUNCATE {table} CASCADE" for table in TABLES),
            "DELETE FROM stripe_webhook_events",
            "DELETE FROM stripe_object_tombstones",
        ):
            assert _refused(connection, statement), statement
        assert _refused(connection, "SELECT stripe_apply_event('{\"id\": \"evt_x\"}'::jsonb, NULL, 'webhook')")
    with engine.connect() as connection:
        emails = connection.execute(text("SELECT customer_email FROM stripe_customers ORDER BY 1")).scalars().all()
    assert emails == ["alice@example.com", "bob@example.com", "nobody@example.com"]


def test_anon_sees_nothing(engine: Engine, two_customers: tuple[str, str]) -> None:
    with acting_as(engine, "anon") as connection:
        assert connection.execute(text("SELECT count(*) FROM stripe_customers")).scalar_one() == 0
        assert _refused(connection, "SELECT * FROM stripe_webhook_events")
        for table in TABLES:
            assert _refused(connection, f"TRUNCATE {table} CASCADE"), table
            assert _refused(connection, f"DELETE FROM {table}"), table
        assert _refused(connection, "UPDATE stripe_customers SET customer_name = 'x'")


def test_service_role_does_everything(engine: Engine, two_customers: tuple[str, str]) -> None:
    with acting_as(engine, "service_role") as connection:
        assert connection.execute(text("SELECT count(*) FROM stripe_customers")).scalar_one() == 3
        connection.execute(text("INSERT INTO stripe_customers (stripe_customer_id) VALUES ('cus_New')"))
        assert connection.execute(text("UPDATE stripe_customers SET customer_name = 'x'")).rowcount == 4
        assert connection.execute(text("DELETE FROM stripe_customers WHERE user_id IS NULL")).rowcount == 2
        audit = (
            connection.execute(
                text("SELECT DISTINCT changed_by FROM stripe_customers_audit WHERE stripe_customer_id = 'cus_New'")
            )
            .scalars()
            .all()
        )
        assert audit == ["service_role"]


def test_service_role_deletes_on_a_connection_that_cached_the_deletion_trigger(engine: Engine) -> None:
    # plpgsql switches to a generic plan after five runs; its check of auth.users is then made as
    # whoever deletes, and service_role may not read auth.users (this failed in CI).
    one_connection = create_engine(engine.url, poolclass=StaticPool)
    try:
        for n in range(8):
            user_id = add_user(engine)
            with one_connection.begin() as connection:
                connection.execute(
                    text("INSERT INTO stripe_customers (stripe_customer_id, user_id) VALUES (:c, :u)"),
                    {"c": f"cus_Warm{n}", "u": user_id},
                )
                connection.execute(text("DELETE FROM stripe_customers"))
        with one_connection.begin() as connection:
            connection.execute(text("INSERT INTO stripe_customers (stripe_customer_id) VALUES ('cus_Loose')"))
        with acting_as(one_connection, "service_role") as connection:
            assert connection.execute(text("DELETE FROM stripe_customers")).rowcount == 1
            tombstone = text(
                "SELECT count(*) FROM stripe_object_tombstones WHERE object = 'customer' AND stripe_id = 'cus_Loose'"
            )
            assert connection.execute(tombstone).scalar_one() == 1
    finally:
        one_connection.dispose()


_CATALOG = {
    # Every consumer table without row level security (all of them must have it on).
    "without_rls": "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace "
    "AND relkind = 'r' AND relname LIKE 'stripe\\_%' AND NOT relrowsecurity ORDER BY 1",
    # Every SECURITY DEFINER function (the consumer's, and the shim's auth.*) without a fixed search_path.
    "definer_without_search_path": "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.prosecdef "
    "AND p.pronamespace IN ('public'::regnamespace, 'auth'::regnamespace) "
    "AND NOT coalesce(p.proconfig::text[] && ARRAY['search_path=\"\"', 'search_path='], false) ORDER BY 1",
    # What the API roles may do with the consumer's tables, sequences and functions.
    "granted": """
        SELECT c.relname || ':' || r.rolname || ':' || p.privilege FROM pg_class c
        CROSS JOIN (VALUES ('anon'), ('authenticated')) AS r (rolname)
        CROSS JOIN (VALUES ('SELECT'), ('INSERT'), ('UPDATE'), ('DELETE'), ('TRUNCATE'), ('REFERENCES'),
                           ('TRIGGER')) AS p (privilege)
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v') AND c.relname LIKE 'stripe\\_%'
          AND has_table_privilege(r.rolname, c.oid, p.privilege)
        UNION ALL
        SELECT c.relname || ':' || r.rolname || ':' || p.privilege FROM pg_class c
        CROSS JOIN (VALUES ('anon'), ('authenticated')) AS r (rolname)
        CROSS JOIN (VALUES ('USAGE'), ('SELECT'), ('UPDATE')) AS p (privilege)
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S' AND c.relname LIKE 'stripe\\_%'
          AND has_sequence_privilege(r.rolname, c.oid, p.privilege)
        UNION ALL
        SELECT p.oid::regprocedure::text || ':' || r.rolname || ':' || 'EXECUTE' FROM pg_proc p
        CROSS JOIN (VALUES ('anon'), ('authenticated')) AS r (rolname)
        WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'stripe\\_%'
          AND has_function_privilege(r.rolname, p.oid, 'EXECUTE')
        ORDER BY 1""",
    "tables": "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace "
    "AND relkind = 'r' AND relname LIKE 'stripe\\_%' ORDER BY 1",
    "sequences": "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace "
    "AND relkind = 'S' AND relname LIKE 'stripe\\_%'",
    # Supabase's default privileges, which the shim copies: what a new table or sequence would get.
    "default_grants": "SELECT count(*) FROM pg_default_acl d, aclexplode(d.defaclacl) a "
    "WHERE a.grantee = 'authenticated'::regrole AND d.defaclobjtype IN ('r', 'S')",
}


def _catalog(connection: Any) -> dict[str, Any]:
    return {name: connection.execute(text(sql)).scalars().all() for name, sql in _CATALOG.items()}


# CONTRACT §3 and §7: row level security decides what a user reads of their own customer row, a
# user reads their own row of the view, and calls stripe_has_access(feature) about themselves.
GRANTED = [
    "stripe_customers:anon:SELECT",
    "stripe_customers:authenticated:SELECT",
    "stripe_has_access(text):anon:EXECUTE",
    "stripe_has_access(text):authenticated:EXECUTE",
    "stripe_user_billing:authenticated:SELECT",
]


def test_the_catalog_shows_rls_everywhere_fixed_search_paths_and_no_api_role_privilege(engine: Engine) -> None:
    """One look at pg_class, pg_proc and pg_default_acl, so that a table, sequence or function a
    release adds is covered without a test of its own."""
    with engine.connect() as connection:
        found = _catalog(connection)
    assert found["without_rls"] == []
    assert found["definer_without_search_path"] == []
    assert sorted(found["tables"]) == sorted(TABLES)  # every table is in the list the tests above try
    assert found["sequences"] == [1]  # the one audit's identity
    assert found["default_grants"][0] > 0  # Supabase grants new objects to the API roles ...
    assert found["granted"] == GRANTED  # ... and migrate takes back all but the contract's


def test_a_sequence_the_api_roles_could_rewind_is_revoked_by_the_next_migrate(engine: Engine) -> None:
    with acting_as(engine, "authenticated") as connection, pytest.raises(DBAPIError, match="permission denied"):
        connection.execute(text("SELECT setval('stripe_customers_audit_id_seq', 1)"))
    can_rewind = text("SELECT has_sequence_privilege('authenticated', 'stripe_later_seq', 'UPDATE')")
    with engine.connect() as connection:  # a sequence a later release adds gets Supabase's defaults ...
        connection.execute(text("CREATE SEQUENCE IF NOT EXISTS public.stripe_later_seq"))
        assert connection.execute(can_rewind).scalar()
    try:
        migrations.migrate(engine, shim=False)  # ... until the migrate that adds it
        with engine.connect() as connection:
            assert not connection.execute(can_rewind).scalar()
    finally:
        with engine.connect() as connection:
            connection.execute(text("DROP SEQUENCE public.stripe_later_seq"))


@pytest.mark.parametrize("wrapped", [True, False], ids=["(SELECT stripe_has_access(…))", "bare call"])
def test_a_policy_that_wraps_the_call_asks_once_per_statement(engine: Engine, wrapped: bool) -> None:
    """The README's policy form: wrapped in a SELECT, Postgres evaluates stripe_has_access once per
    statement (an initplan), not once per row of the app's table."""
    user = add_user(engine)
    call = "(SELECT stripe_has_access('pro'))" if wrapped else "stripe_has_access('pro')"
    with engine.connect() as connection:
        connection.execute(
            text("INSERT INTO stripe_customers (stripe_customer_id, user_id) VALUES ('cus_Pol1', :u)"), {"u": user}
        )
        connection.execute(
            text(
                "INSERT INTO stripe_entitlements (stripe_customer_id, lookup_key, feature) "
                "VALUES ('cus_Pol1', 'pro', 'feat_pro')"
            )
        )
        connection.execute(text("DROP TABLE IF EXISTS public.app_documents"))
        connection.execute(
            text("CREATE TABLE public.app_documents AS SELECT n AS id FROM generate_series(1, 10000) AS n")
        )
        connection.execute(text("ALTER TABLE public.app_documents ENABLE ROW LEVEL SECURITY"))
        connection.execute(text(f"CREATE POLICY pro_only ON public.app_documents FOR SELECT USING ({call})"))
        connection.execute(text("GRANT SELECT ON public.app_documents TO authenticated"))
    try:
        with engine.connect() as connection:
            connection = connection.execution_options(isolation_level="READ COMMITTED")
            with connection.begin():
                connection.execute(text("SET LOCAL track_functions = 'all'"))  # counts calls, this transaction
                claims = json.dumps({"role": "authenticated", "sub": user})
                connection.execute(text("SELECT set_config('request.jwt.claims', :c, true)"), {"c": claims})
                connection.execute(text("SET LOCAL ROLE authenticated"))
                assert connection.execute(text("SELECT count(*) FROM public.app_documents")).scalar_one() == 10000
                connection.execute(text("RESET ROLE"))
                calls = connection.execute(
                    text("SELECT pg_stat_get_xact_function_calls('public.stripe_has_access(text)'::regprocedure)")
                ).scalar_one()
        assert calls == 1 if wrapped else calls >= 10000
    finally:
        with engine.connect() as connection:
            connection.execute(text("DROP TABLE public.app_documents"))


def test_a_signed_in_users_row_is_planned_below_the_jit_threshold(scratch_url: str) -> None:
    """With 50,000 users, the view's plan for one signed-in user must stay cheap in the planner's
    eyes: past jit_above_cost, a Postgres with JIT (Debian's 15) compiles the query, 0.4-0.8 s."""
    scratch = database.make_engine(scratch_url, pool_size=1)
    migrations.migrate(scratch, shim=False)
    with scratch.connect() as connection:
        connection.execute(
            text("INSERT INTO auth.users (id) SELECT md5('u' || n)::uuid FROM generate_series(1, 50000) AS n")
        )
        connection.execute(text("ANALYZE auth.users"))
    with acting_as(scratch, "authenticated", "7d0f6a5e-1b9a-4d47-9d55-3f0d3c1f0a11") as connection:
        plan = connection.execute(text("EXPLAIN (FORMAT JSON) SELECT * FROM stripe_user_billing")).scalar_one()
        threshold = float(connection.execute(text("SHOW jit_above_cost")).scalar_one())
    scratch.dispose()
    assert plan[0]["Plan"]["Total Cost"] < threshold, plan[0]["Plan"]["Total Cost"]
