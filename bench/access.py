"""Access at size (figures, not assertions): `python -m bench.access`.

Fills a fresh embedded Postgres (or DATABASE_URL's, which it truncates) by SQL with 1,000,000 users
and customers, 2,000,000 subscriptions (an active and a canceled one each), 5,000,000 active
entitlements (five each), 12,000,000 invoices (a year of monthly ones each, 2% open, half of those
failing for three days), and 100,000 organizations of 10 members each (every user a member of
one), each billed by one of the customers, whose entitlements add `team_feature`; then times, for
random users:
- `stripe_has_access(feature)` as the signed-in user (a transaction as PostgREST opens it): a
  feature of their own customer's, one that only their organization's customer has (the members'
  branch), and one nobody has (both branches, then false); and the user's row of
  `stripe_user_billing`: the query alone, on one connection, the statements taken in turn user
  after user; then the same with STRIPE_PAST_DUE_GRACE set (7 days, in stripe_settings), prepared
  too, as PostgREST sends them;
- the support console's customer page (the in-process app, signed in);
and, on a small database beside it, the database CPU of a subscription event against a customer
event through the consumer's own statement (one event a statement, alternating batches).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import psycopg2.errors
from sqlalchemy import Engine, text

from bench import cluster
from bench.console_size import FILL, signed_in_console, sized_database
from bench.pgcost import _backend_cpu
from webhook import samples, store
from webhook.config import Keys
from webhook.objects import HANDLERS
from webhook.results import Source

BILLING_FILL = [
    (
        "subscriptions",
        "INSERT INTO stripe_subscriptions (stripe_subscription_id, stripe_customer_id, status, items, "
        "current_period_end, subscription_metadata) SELECT 'sub_' || n || k, 'cus_' || n, "
        "CASE k WHEN 'a' THEN 'active' ELSE 'canceled' END, "
        "jsonb_build_array(jsonb_build_object('price', 'price_pro', 'lookup_key', 'pro', 'quantity', 1, "
        "'tier', 'pro')), "
        "now() + interval '20 days', '{}' FROM generate_series(1, :customers) AS n, unnest(ARRAY['a', 'c']) AS k",
    ),
    (
        "entitlements",
        "INSERT INTO stripe_entitlements (stripe_customer_id, lookup_key, feature, stripe_entitlement_id) "
        "SELECT 'cus_' || n, 'feature_' || k, 'feat_' || k, 'ent_' || n || '_' || k "
        "FROM generate_series(1, :customers) AS n, generate_series(0, 4) AS k",
    ),
    (
        "entitlement sets",
        "INSERT INTO stripe_entitlement_sets (stripe_customer_id, complete, entitlements_metadata) "
        "SELECT 'cus_' || n, true, '{}' FROM generate_series(1, :customers) AS n",
    ),
]
BILLING_TABLES = ("stripe_subscriptions", "stripe_entitlements", "stripe_entitlement_sets", "stripe_invoices")
# A year of monthly invoices per customer, 2% of them open, half of those failing for 3 days.
INVOICE_FILL = (
    "invoices",
    "INSERT INTO stripe_invoices (stripe_invoice_id, stripe_customer_id, stripe_subscription_id, status, amount_due, "
    "amount_paid, amount_remaining, currency, attempt_count, failing_since, hosted_invoice_url, lines, "
    "invoice_metadata) SELECT 'in_' || n || 'm' || m, 'cus_' || n, 'sub_' || n || 'a', "
    "CASE WHEN (n * 12 + m) % 50 = 0 THEN 'open' ELSE 'paid' END, 2900, "
    "CASE WHEN (n * 12 + m) % 50 = 0 THEN 0 ELSE 2900 END, CASE WHEN (n * 12 + m) % 50 = 0 THEN 2900 ELSE 0 END, "
    "'usd', CASE WHEN (n * 12 + m) % 100 = 0 THEN 2 ELSE 0 END, "
    "CASE WHEN (n * 12 + m) % 100 = 0 THEN now() - interval '3 days' END, "
    "'https://invoice.stripe.com/i/' || n || 'm' || m, "
    "jsonb_build_array(jsonb_build_object('price', 'price_pro', 'quantity', 1, 'amount', 2900)), '{}' "
    "FROM generate_series(1, :customers) AS n, generate_series(1, 12) AS m",
)
GRACE = "INSERT INTO stripe_settings (name, value) VALUES ('past_due_grace', '604800')"  # 7 days
# Organization n has members 10(n-1)+1 … 10n and is billed by customer n (who is also user n's).
ORGANIZATION_FILL = [
    (
        "organizations",
        "INSERT INTO public.organizations (id, name) SELECT md5('o' || n)::uuid, 'Org ' || n "
        "FROM generate_series(1, :organizations) AS n",
    ),
    (
        "organization members",
        "INSERT INTO public.organization_members (organization_id, user_id) "
        "SELECT md5('o' || (1 + (m - 1) / 10))::uuid, md5('u' || m)::uuid "
        "FROM generate_series(1, :organizations * 10) AS m",
    ),
    (
        "organizations' customers",
        "UPDATE stripe_customers SET organization_id = md5('o' || n)::uuid "
        "FROM generate_series(1, :organizations) AS n WHERE stripe_customer_id = 'cus_' || n",
    ),
    (
        "organizations' entitlements",
        "INSERT INTO stripe_entitlements (stripe_customer_id, lookup_key, feature, stripe_entitlement_id) "
        "SELECT 'cus_' || n, 'team_feature', 'feat_team', 'ent_team_' || n "
        "FROM generate_series(1, :organizations) AS n",
    ),
]


def fill(engine: Engine, customers: int, organizations: int, invoices: bool = True) -> None:
    with engine.connect() as connection:
        connection.execute(
            text(
                "TRUNCATE stripe_customers, stripe_webhook_events, stripe_customers_audit, stripe_subscriptions, "
                "stripe_entitlements, stripe_entitlement_sets, stripe_invoices, stripe_settings, public.organizations, "
                "auth.users CASCADE"
            )
        )
        for table in ("stripe_customers", *BILLING_TABLES):
            connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))  # no audit rows for the fill
        try:
            steps = [step for step in FILL if step[0] in ("users", "customers")] + BILLING_FILL + ORGANIZATION_FILL
            steps += [INVOICE_FILL] if invoices else []
            for name, sql in steps:
                started = time.monotonic()
                connection.execute(text(sql), {"customers": customers, "organizations": organizations})
                print(f"filled {name} in {time.monotonic() - started:.0f} s", flush=True)
        finally:
            for table in ("stripe_customers", *BILLING_TABLES):
                connection.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))
        connection.execute(text("VACUUM ANALYZE"))
        connection.execute(text("CHECKPOINT"))  # the fill's dirty pages written now, not while timing


def _user(n: int) -> str:
    return str(uuid.UUID(__import__("hashlib").md5(f"u{n}".encode()).hexdigest()))


class Timed(NamedTuple):
    sql: str  # %s: the user's number, for a statement about a user given as an argument
    users: list[int]
    role: str = "authenticated"
    prepared: bool = False  # as PostgREST sends it (db-prepared-statements): planned once


def time_as_users(engine: Engine, timed: list[Timed]) -> list[list[float]]:
    """Each statement's round trips (ms, sorted), each call in a transaction as PostgREST opens one
    for a user (the claims, SET LOCAL ROLE), the statements taken in turn user after user: a noisy
    moment of this machine falls on all of them alike, not on whichever was being timed. Timed on
    the driver's own cursor, as a client as thin as PostgREST's would see it: through SQLAlchemy's
    execute the same call took 0.05-0.14 ms more at the median and several times the spread at
    p99, the client's Python, not the database."""
    taken: list[list[float]] = [[] for _ in timed]
    raw = engine.raw_connection()  # in autocommit, as the engine's connections are
    cursor = raw.cursor()
    try:
        cursor.execute("DEALLOCATE ALL")  # pooled: some prepared earlier
        sent = []
        for k, statement in enumerate(timed):
            if statement.prepared:
                cursor.execute(f"PREPARE timed_{k} AS {statement.sql}")
            sent.append(f"EXECUTE timed_{k}" if statement.prepared else statement.sql)
        for turn in range(max(len(statement.users) for statement in timed)):
            for k, statement in enumerate(timed):
                n = statement.users[turn]
                claims = json.dumps({"sub": _user(n), "role": "authenticated"})
                cursor.execute("BEGIN")
                cursor.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims,))
                cursor.execute(f"SET LOCAL ROLE {statement.role}")
                started = time.perf_counter()
                cursor.execute(sent[k] % n if "%s" in sent[k] else sent[k])
                rows = cursor.fetchall()
                taken[k].append((time.perf_counter() - started) * 1000)
                # One row at most: more, and the role or the claims did not take (a superuser's view).
                assert len(rows) <= 1, f"{len(rows)} rows as {statement.role}"
                cursor.execute("COMMIT")
    finally:
        cursor.close()
        raw.close()
    return [sorted(samples) for samples in taken]


def plans(engine: Engine, user: int) -> list[str]:
    """EXPLAIN ANALYZE of the user's row and, where the server has auto_explain (Debian's packages
    do, the embedded build does not), of the statements stripe_has_access runs inside, each run
    once before so that the plans shown are the warm ones a pooled connection keeps."""
    shown = []
    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection
        with raw.cursor() as cursor:  # type: ignore[union-attr]
            try:
                cursor.execute("LOAD 'auto_explain'")
                explained = True
            except psycopg2.errors.UndefinedFile as refused:  # a build without it: the view's plan alone
                shown.append(f"(stripe_has_access's inner plans not shown: {str(refused).strip()})")
                explained = False
            claims = json.dumps({"sub": _user(user), "role": "authenticated"})
            for sql in ("SELECT * FROM public.stripe_user_billing", "SELECT public.stripe_has_access('feature_3')"):
                cursor.execute("BEGIN")  # the engine's connections are in autocommit
                cursor.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims,))
                if explained:
                    cursor.execute(
                        "SET LOCAL auto_explain.log_min_duration = 0; SET LOCAL auto_explain.log_analyze = on; "
                        "SET LOCAL auto_explain.log_nested_statements = on; SET LOCAL client_min_messages = log"
                    )
                cursor.execute("SET LOCAL ROLE authenticated")
                cursor.execute(sql)  # warm: the plpgsql plans are kept after this
                del raw.notices[:]  # type: ignore[union-attr]
                if sql.startswith("SELECT *"):
                    cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
                    shown.append(f"{sql}:\n" + "\n".join(row[0] for row in cursor.fetchall()))
                elif explained:
                    cursor.execute(sql)
                    nested = [notice for notice in raw.notices if "Query Text" in notice]  # type: ignore[union-attr]
                    shown.append(f"{sql}, the statements it runs:\n" + "".join(nested))
                cursor.execute("ROLLBACK")
    return shown


def event_cost(engine: Engine, batches: int, per_batch: int) -> dict[str, float]:
    """Backend CPU (ms) per event of the consumer's statement, customer against subscription events."""
    customers = [samples.customer() for _ in range(50)]
    made = {
        "customer.updated": lambda n: samples.event("customer.updated", {**customers[n % 50], "name": f"v{n}"}),
        "customer.subscription.updated": lambda n: samples.event(
            "customer.subscription.updated",
            samples.subscription(customers[n % 50]["id"], f"sub_bench{n % 50}", status="active"),
        ),
    }
    spent = {kind: 0.0 for kind in made}
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchall()[0][0]
        for batch in range(batches):
            for kind, make in made.items():
                events = [make(batch * per_batch + n) for n in range(per_batch)]
                calls = [(json.dumps(e), HANDLERS[e["type"]](e["data"]["object"], Keys()).as_json()) for e in events]  # type: ignore[union-attr]
                before = _backend_cpu(pid)
                for payload, change in calls:
                    store.apply_events(raw, [store.EventToApply(payload, change, Source.WEBHOOK)])
                spent[kind] += _backend_cpu(pid) - before
    finally:
        raw.close()
    return {kind: total * 1000 / (batches * per_batch) for kind, total in spent.items()}


class Measured(NamedTuple):
    version: str  # the server's
    timed: list[tuple[str, list[float]]]  # each timed query's samples, sorted, in ms
    costs: dict[str, float]  # the consumer's statement's backend CPU per event, in ms
    plans: list[str]  # the user's row's and stripe_has_access's, grace set


def measure(url: str, engine: Engine, args: argparse.Namespace) -> Measured:
    with engine.connect() as connection:
        version = str(connection.execute(text("SHOW server_version")).scalar_one()).split()[0]
    costs = event_cost(engine, batches=6, per_batch=300)
    fill(engine, args.customers, args.organizations)

    users = random.Random(7).sample(range(1, args.customers + 1), args.samples)
    members = random.Random(8).sample(range(args.organizations + 1, args.organizations * 10 + 1), args.samples)
    has_access, through, nobody, billing_row, service = time_as_users(
        engine,
        [
            Timed("SELECT public.stripe_has_access('feature_3')", users),
            Timed("SELECT public.stripe_has_access('team_feature')", members),
            Timed("SELECT public.stripe_has_access('absent')", members),
            Timed("SELECT * FROM public.stripe_user_billing", users),
            Timed("SELECT public.stripe_has_access('feature_3', md5('u' || %s)::uuid)", users, role="service_role"),
        ],
    )
    with engine.begin() as connection:
        connection.execute(text(GRACE))
    graced, graced_members, graced_row, graced_prepared, graced_row_prepared = time_as_users(
        engine,
        [
            Timed("SELECT public.stripe_has_access('feature_3')", users),
            Timed("SELECT public.stripe_has_access('team_feature')", members),
            Timed("SELECT * FROM public.stripe_user_billing", users),
            Timed("SELECT public.stripe_has_access('feature_3')", users, prepared=True),
            Timed("SELECT * FROM public.stripe_user_billing", users, prepared=True),
        ],
    )
    shown = plans(engine, users[0])
    with engine.connect() as connection:  # the timed answers were the members' branch's, not a miss
        granted = connection.execute(
            text(
                "SELECT count(*) FILTER (WHERE public.stripe_has_access('team_feature', md5('u' || m)::uuid)) "
                "FROM unnest(CAST(:members AS int[])) AS m"
            ),
            {"members": members},
        ).scalar_one()
    client = signed_in_console(url, engine)
    pages = []
    for n in users[:300]:
        started = time.perf_counter()
        assert client.get(f"/support/customers/cus_{n}").status_code == 200
        pages.append((time.perf_counter() - started) * 1000)
    pages.sort()
    return Measured(
        version,
        [
            ("stripe_has_access('feature_3') as the signed-in user", has_access),
            ("stripe_has_access(feature, user) as service_role", service),
            (f"stripe_has_access through the user's organization (true for {granted} of {len(members)})", through),
            ("stripe_has_access of a feature nobody has (both branches)", nobody),
            ("the user's row of stripe_user_billing", billing_row),
            ("stripe_has_access('feature_3'), STRIPE_PAST_DUE_GRACE set", graced),
            ("stripe_has_access through the organization, grace set", graced_members),
            ("the user's row of stripe_user_billing, grace set", graced_row),
            ("stripe_has_access, grace set, prepared as PostgREST sends it", graced_prepared),
            ("the user's row of stripe_user_billing, grace set, prepared", graced_row_prepared),
            ("the console's customer page (in-process app, rendered)", pages),
        ],
        costs,
        shown,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--organizations", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument(
        "--postgres-bin",
        type=Path,
        help="also measure on a scratch cluster of these server binaries (Debian's PostgreSQL 15: "
        "/usr/lib/postgresql/15/bin), beside the embedded one",
    )
    args = parser.parse_args()
    if args.organizations * 10 > args.customers:
        parser.error("each organization has 10 members: --organizations at most --customers / 10")
    servers = [None] + ([cluster.start(args.postgres_bin)] if args.postgres_bin else [])
    results: list[Measured] = []
    for server_url in servers:
        url, engine = sized_database("access-size-", server_url)
        results.append(measure(url, engine, args))
        engine.dispose()

    print(
        f"\n{args.customers:,} customers, {2 * args.customers:,} subscriptions, {5 * args.customers:,} entitlements, "
        f"{12 * args.customers:,} invoices (2% open), "
        f"{args.organizations:,} organizations of 10 members; {args.samples} samples each\n"
    )
    head = " | ".join(f"Postgres {measured.version} median / p99 ms" for measured in results)
    print(f"| what | {head} |\n|---|{'---|' * len(results)}")
    for row, (what, _) in enumerate(results[0].timed):
        cells = " | ".join(_cell(measured.timed[row][1]) for measured in results)
        print(f"| {what} | {cells} |")
    print("\nthe consumer's statement, one event a statement, backend CPU per event:")
    for measured in results:
        costs = measured.costs.items()
        print(f"  Postgres {measured.version}: " + ", ".join(f"{kind} {cost:.3f} ms" for kind, cost in costs))
    for measured in results:
        print(f"\nthe plans on Postgres {measured.version}, grace set, as the signed-in user:")
        for plan in measured.plans:
            print(plan)


def _cell(taken: list[float]) -> str:
    p99 = taken[min(len(taken) - 1, int(len(taken) * 0.99))]
    return f"{statistics.median(taken):.3f} / {p99:.3f}"


if __name__ == "__main__":
    main()
