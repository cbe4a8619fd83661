"""Held locks, signature timestamps, diagnosable database errors and usage errors, tried from the
outside (a lock held by another connection, CLI subprocesses)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from tests.support import SECRET, add_user, cli, deliver, event_row, settings_for
from webhook import samples
from webhook.app import create_app


def test_a_held_lock_answers_503_within_seconds(client: FlaskClient, engine: Engine) -> None:
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:  # a migration or a stuck transaction
        with engine.connect() as autocommit:
            connection = autocommit.execution_options(isolation_level="READ COMMITTED")
            connection.begin()
            connection.execute(text("LOCK TABLE public.stripe_customers IN ACCESS EXCLUSIVE MODE"))
            locked.set()
            release.wait(30)
            connection.rollback()

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(10)
    event = samples.event("customer.created", samples.customer())
    started = time.monotonic()
    answer = deliver(client, event)
    waited = time.monotonic() - started
    release.set()
    holder.join()

    assert answer.status_code == 503 and waited < 4, (answer.status_code, waited)
    assert event_row(engine, event["id"]) is None  # nothing written: Stripe's retry will apply it
    assert deliver(client, event).get_json()["status"] == "processed"


def test_signature_timestamps_beyond_the_tolerance_either_way_are_refused(client: FlaskClient) -> None:
    event = samples.event("customer.created", samples.customer())
    for offset in (3600, -3600):
        answer = deliver(client, event, timestamp=int(time.time()) + offset)
        assert answer.status_code == 400 and "tolerance" in answer.get_json()["error"], offset
    assert deliver(client, event, timestamp=int(time.time()) + 60).status_code == 200


def test_a_tolerance_below_one_second_is_refused_at_start(database_url: str) -> None:
    result = cli("replay", DATABASE_URL=database_url, STRIPE_WEBHOOK_SECRET=SECRET, STRIPE_WEBHOOK_TOLERANCE="0")
    assert result.returncode == 2 and "STRIPE_WEBHOOK_TOLERANCE" in result.stderr


def test_an_absurd_duration_is_a_usage_error(database_url: str) -> None:
    result = cli("replay", "--since", "99999999999d", DATABASE_URL=database_url, STRIPE_WEBHOOK_SECRET=SECRET)
    assert result.returncode == 2 and "100 years" in result.stderr


def test_database_errors_say_what_and_where_never_the_password(database_url: str) -> None:
    url = make_url(database_url)
    wrong_password = url.set(username="nobody_here", password="hunter2-secret").render_as_string(hide_password=False)
    refused = "postgresql://app:hunter2-secret@127.0.0.1:1/billing"
    for target, says in ((wrong_password, "nobody_here"), (refused, "Connection refused")):
        result = cli("replay", DATABASE_URL=target, STRIPE_WEBHOOK_SECRET=SECRET)
        assert result.returncode == 1, result.stderr
        assert says in result.stderr and "user=" in result.stderr and "database=" in result.stderr, result.stderr
        assert "hunter2-secret" not in result.stderr + result.stdout
        assert "OperationalError: OperationalError" not in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.reliability  # slow (a long wait by design): beside the soak, not in the default run
def test_migrate_backup_never_shows_the_password_and_never_hangs(database_url: str, tmp_path: Path) -> None:
    url = make_url(database_url).set(username="nobody_here", password="hunter2-secret")
    wrong = cli(
        "db",
        "migrate",
        "--backup-dir",
        str(tmp_path),
        DATABASE_URL=url.render_as_string(hide_password=False),
        STRIPE_WEBHOOK_SECRET=SECRET,
    )
    assert wrong.returncode == 1 and "pg_dump" in wrong.stderr and "nobody_here" in wrong.stderr, wrong.stderr
    assert "hunter2-secret" not in wrong.stderr + wrong.stdout and "Traceback" not in wrong.stderr

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host_url = f"postgresql://app:hunter2-secret@127.0.0.1:{silent.getsockname()[1]}/billing"
        started = time.monotonic()
        hung = cli("db", "migrate", "--backup-dir", str(tmp_path), DATABASE_URL=host_url, STRIPE_WEBHOOK_SECRET=SECRET)
        waited = time.monotonic() - started
    assert hung.returncode == 1 and waited < 30, (hung.returncode, waited, hung.stderr)
    assert "hunter2-secret" not in hung.stderr + hung.stdout


@pytest.mark.reliability  # slow (a long wait by design): beside the soak, not in the default run
def test_readyz_answers_within_two_seconds_when_the_database_never_answers(database_url: str) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        app = create_app(settings_for(f"postgresql://app:pw@127.0.0.1:{silent.getsockname()[1]}/billing"))
        client = app.test_client()
        for _ in range(2):  # the second probe finds the first check still waiting, and shares it
            started = time.monotonic()
            answer = client.get("/readyz")
            waited = time.monotonic() - started
            assert answer.status_code == 503 and waited < 3, (answer.status_code, waited)
            assert "did not answer" in answer.get_json()["error"]


@pytest.mark.reliability  # about half a minute: three tries of ten seconds
def test_ensure_customer_gives_up_on_a_stripe_that_never_answers(database_url: str, engine: Engine) -> None:
    user_id = add_user(engine)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        result = cli(
            "ensure-customer",
            "--user-id",
            user_id,
            DATABASE_URL=database_url,
            STRIPE_WEBHOOK_SECRET=SECRET,
            STRIPE_API_KEY="sk_test_never_printed_123",
            STRIPE_API_BASE=f"http://127.0.0.1:{silent.getsockname()[1]}",
        )
        waited = time.monotonic() - started
    print(f"\nensure-customer against a silent Stripe gave up after {waited:.1f} s")
    assert result.returncode == 1 and waited < 45, (result.returncode, waited, result.stderr)
    assert "could not reach the Stripe API" in result.stderr
    assert "sk_test_never_printed_123" not in result.stderr + result.stdout
