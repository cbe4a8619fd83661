"""The server's commands: serve, db migrate / rollback, and send (a local `stripe trigger`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import stripe

from webhook import embedded, migrations, objects_store, samples
from webhook.cli.common import EXIT_FAILURES, EXIT_OK, Commands, UsageError, engine_for
from webhook.config import DATA_DIR, Settings
from webhook.database import make_engine
from webhook.serving import gunicorn_command


def add_commands(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="run the consumer under gunicorn")
    serve.add_argument("--port", type=int, help="port to listen on (default: PORT, 8000)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (default: WEB_CONCURRENCY, 2)")
    serve.set_defaults(run=cmd_serve)

    db = commands.add_parser("db", help="apply or undo the schema").add_subparsers(dest="db_command", required=True)
    migrate = db.add_parser(
        "migrate",
        help=f"apply the schema ({', '.join('db/' + path.name for path in migrations.APPLIED)}), in that order; "
        "each step idempotent and safe beside live traffic",
    )
    migrate.add_argument("--shim", action="store_true", help="apply db/supabase_shim.sql first (never on Supabase)")
    migrate.add_argument("--backup-dir", help="pg_dump --schema-only into this folder first")
    migrate.set_defaults(run=cmd_db_migrate)
    sql = db.add_parser(
        "sql",
        help="print the SQL db migrate applies, as one idempotent migration for the team's own tool "
        "(supabase/migrations, Alembic, Flyway); no database needed",
    )
    sql.add_argument("--shim", action="store_true", help="with db/supabase_shim.sql first (never for Supabase)")
    sql.set_defaults(run=cmd_db_sql)
    rollback = db.add_parser("rollback", help="apply db/rollback.sql")
    rollback.add_argument("--yes", action="store_true", help="confirm dropping the tables")
    rollback.add_argument(
        "--to-previous-release",
        action="store_true",
        help="instead, keep every row and put back the shapes the release before 2026-12-07 reads "
        "(db/one_shape_undo.sql); then deploy that release",
    )
    rollback.set_defaults(run=cmd_db_rollback)

    send = commands.add_parser("send", help="sign and POST a realistic event (a local `stripe trigger`)")
    send.add_argument("type", help="event type, e.g. customer.created")
    send.add_argument("--url", help="where to POST (default: http://127.0.0.1:PORT/webhooks/stripe)")
    send.add_argument("--port", type=int, help="the port `serve --port` listens on (default: PORT, 8000)")
    send.add_argument("--customer-id", help="the customer's cus_… id (default: a new one)")
    send.add_argument("--email", help="the customer's email")
    send.add_argument("--name", help="the customer's name")
    send.add_argument("--user-id", help="the auth.users id: metadata.user_id, or a checkout's client_reference_id")
    send.add_argument("--created", type=int, help="unix seconds (default: now)")
    send.add_argument(
        "--thin",
        action="store_true",
        help="send a thin notification (TYPE like v1.customer.updated; --customer-id names it)",
    )
    send.set_defaults(run=cmd_send, finds_secret=True)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    env = dict(os.environ)
    port = args.port or settings.port
    if settings.embedded:
        database_url = embedded.start(settings.data_dir)
        migrations.migrate(make_engine(database_url, pool_size=1), shim=True)
        print(f"embedded Postgres under {settings.data_dir / 'postgres'}, schema applied", flush=True)
        print(f"dev webhook secret (also in {settings.data_dir / 'webhook_secret'}): {settings.webhook_secrets[0]}")
        print(f"forward Stripe events: stripe listen --forward-to localhost:{port}/webhooks/stripe", flush=True)
        # The embedded server listens on a local socket only; serve the dev consumer on loopback too.
        env.update(DATABASE_URL=database_url, STRIPE_WEBHOOK_SECRET=",".join(settings.webhook_secrets))
        bind = f"127.0.0.1:{port}"
    else:
        bind = f"0.0.0.0:{port}"
    workers = ["--workers", str(args.workers)] if args.workers else []
    gunicorn = subprocess.Popen(gunicorn_command(bind, *workers), env=env)
    # Stay the parent so the embedded Postgres lives exactly as long as the server.
    signal.signal(signal.SIGTERM, lambda *_: gunicorn.terminate())
    try:
        return gunicorn.wait()
    except KeyboardInterrupt:
        gunicorn.terminate()
        return gunicorn.wait()


def cmd_db_migrate(settings: Settings, args: argparse.Namespace) -> int:
    database_url = embedded.database_url(settings)
    if args.backup_dir:
        try:
            target = migrations.backup_schema(database_url, Path(args.backup_dir))
        except migrations.BackupFailed as failure:
            print(f"error: {failure}; nothing migrated", file=sys.stderr)
            return EXIT_FAILURES
        print(f"schema backed up to {target}")
    engine = make_engine(database_url, pool_size=1)
    try:
        applied = migrations.migrate(engine, shim=args.shim)
    except migrations.MigrationFailed as failure:
        print(f"error: {failure}; the steps before it are applied, run db migrate again", file=sys.stderr)
        return EXIT_FAILURES
    with engine.connect() as connection:
        objects_store.write_settings(connection, settings.past_due_grace)
    print("applied " + ", ".join(path.name for path in applied))
    return EXIT_OK


def cmd_db_sql(settings: Settings, args: argparse.Namespace) -> int:
    sys.stdout.write(migrations.as_one_migration(args.shim))
    return EXIT_OK


def cmd_db_rollback(settings: Settings, args: argparse.Namespace) -> int:
    if args.to_previous_release:
        migrations.to_previous_release(engine_for(settings))
        print("applied one_shape_undo.sql: deploy the previous release, whose db migrate restores its functions")
        return EXIT_OK
    if not args.yes:
        raise UsageError("db rollback drops the Stripe tables and their data; pass --yes to confirm")
    migrations.rollback(engine_for(settings))
    print("applied rollback.sql")
    return EXIT_OK


def _signing_secret(settings: Settings) -> tuple[str, str]:
    """The secret `send` signs with, and where it came from: STRIPE_WEBHOOK_SECRET, else the one
    `serve` keeps in .data/webhook_secret of this folder or the nearest folder above it."""
    if settings.webhook_secrets:
        where = (
            "STRIPE_WEBHOOK_SECRET"
            if os.environ.get("STRIPE_WEBHOOK_SECRET")
            else str(settings.data_dir / "webhook_secret")
        )
        return settings.webhook_secrets[0], where
    for folder in Path.cwd().resolve().parents:
        kept = folder / DATA_DIR / "webhook_secret"
        if kept.is_file():
            return kept.read_text().strip(), str(kept)
    raise UsageError(
        "no webhook secret to sign with: run send in the folder `serve` runs in (it keeps .data/webhook_secret), "
        "or set STRIPE_WEBHOOK_SECRET to the server's secret"
    )


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    url = args.url or f"http://127.0.0.1:{args.port or settings.port}/webhooks/stripe"
    secret, secret_source = _signing_secret(settings)
    if args.thin:
        if not args.type.startswith(("v1.", "v2.")):
            raise UsageError("a thin event's type starts with v1. or v2. (v1.customer.updated, …)")
        event = samples.thin_event(args.type, args.customer_id or samples.stripe_id("cus"), created=args.created)
    else:
        event = samples.event_of_type(
            args.type,
            customer_id=args.customer_id,
            email=args.email,
            name=args.name,
            user_id=args.user_id,
            created=args.created,
            user_id_key=settings.user_id_metadata_key,
        )
    body = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(body, secret)
    request = urllib.request.Request(
        url,
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Stripe-Signature": header},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, answer = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, answer = error.code, error.read().decode()
    except urllib.error.URLError as error:
        print(f"error: could not reach {url}: {error.reason}", file=sys.stderr)
        return EXIT_FAILURES
    print(f"{args.type} {event['id']} -> {status} {answer.strip()}")
    if status == 400 and "no valid signature" in answer:
        print(
            f"error: signed with the secret from {secret_source}, which the server does not have: run send in "
            "the folder `serve` runs in, or set STRIPE_WEBHOOK_SECRET to the server's secret",
            file=sys.stderr,
        )
    return EXIT_OK if 200 <= status < 300 else EXIT_FAILURES
