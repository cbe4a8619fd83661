"""`python -m webhook …` / `stripe-webhook …`: run, migrate, and operate the consumer.

Exit codes: 0 done, 1 the work found failures or drift, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import stripe
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.security import generate_password_hash

from webhook import embedded, migrations, samples, stripe_api
from webhook.config import SUPPORT_NAME, ConfigError, Settings, load_settings, parse_duration
from webhook.customers import UnknownUser, ensure_customer
from webhook.jobs_cli import EXIT_FAILURES, EXIT_OK, EXIT_USAGE, add_commands, engine_for
from webhook.process import DatabaseUnavailable, describe
from webhook.replay import ReplaySummary, replay_from_stripe, replay_stored
from webhook.store import describe_target, make_engine


class UsageError(Exception):
    """Bad usage found after parsing; printed as one line, exit 2."""


def duration(text: str) -> int:
    """'90s', '30m', '24h', '7d' as seconds (an argparse type)."""
    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if seconds == 0:
        raise argparse.ArgumentTypeError("a duration must be longer than 0")
    return seconds


def gunicorn_command(bind: str, *options: str, app: str = "webhook.app:create_app()") -> list[str]:
    """gunicorn with this project's settings (webhook/gunicorn_conf.py), as `serve`, the tests and
    the benchmark all start it."""
    return [sys.executable, "-m", "gunicorn", "-c", "python:webhook.gunicorn_conf", "--bind", bind, *options, app]


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
    try:
        applied = migrations.migrate(make_engine(database_url, pool_size=1), shim=args.shim)
    except migrations.MigrationFailed as failure:
        print(f"error: {failure}; the steps before it are applied, run db migrate again", file=sys.stderr)
        return EXIT_FAILURES
    print("applied " + ", ".join(path.name for path in applied))
    return EXIT_OK


def cmd_db_rollback(settings: Settings, args: argparse.Namespace) -> int:
    if not args.yes:
        raise UsageError("db rollback drops the Stripe tables and their data; pass --yes to confirm")
    migrations.rollback(engine_for(settings))
    print("applied rollback.sql")
    return EXIT_OK


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    url = args.url or f"http://127.0.0.1:{settings.port}/webhooks/stripe"
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
    header = stripe.WebhookSignature.generate_signature_header(body, settings.webhook_secrets[0])
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
    return EXIT_OK if 200 <= status < 300 else EXIT_FAILURES


def _finish(summary: ReplaySummary) -> int:
    for failure in summary.failures:
        print(f"failed {failure}")
    print(summary.line())
    return EXIT_FAILURES if summary.failed else EXIT_OK


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    engine = engine_for(settings)
    if args.from_stripe:
        if args.event or args.status:
            raise UsageError("--from-stripe takes only --since")
        window = min(args.since or 72 * 3600, stripe_api.EVENTS_KEPT_SECONDS)
        client = stripe_api.make_client(settings)
        return _finish(replay_from_stripe(engine, settings, client, since=int(time.time()) - window))
    if args.event and (args.status or args.since):
        raise UsageError("--event names one event; it takes no --status or --since")
    summary = replay_stored(
        engine, settings, event_id=args.event, status=args.status or "failed", since_seconds=args.since
    )
    if args.event and not summary.outcomes:
        print(f"error: no stored event {args.event}", file=sys.stderr)
        return EXIT_FAILURES
    return _finish(summary)


def cmd_ensure_customer(settings: Settings, args: argparse.Namespace) -> int:
    client = stripe_api.make_client(settings)
    try:
        print(ensure_customer(engine_for(settings), client, args.user_id, settings.user_id_metadata_key))
    except UnknownUser:
        print(f"error: no auth.users row has id {args.user_id}", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


def cmd_support_user(settings: Settings, args: argparse.Namespace) -> int:
    if not SUPPORT_NAME.fullmatch(args.name):
        raise UsageError("a support name is 1 to 64 letters, digits, _ . @ or -")
    password = getpass.getpass(f"password for {args.name}: ")
    if len(password) < 12:
        raise UsageError("a support password has at least 12 characters")
    if getpass.getpass("again: ") != password:
        raise UsageError("the two passwords differ")
    # Salted and slow (scrypt); the password itself is never stored or printed.
    print(f"{args.name}:{generate_password_hash(password)}")
    return EXIT_OK


def _user_id(text: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stripe-webhook", description="Stripe customer webhook consumer")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the consumer under gunicorn")
    serve.add_argument("--port", type=int, help="port to listen on (default: PORT, 8000)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (default: WEB_CONCURRENCY, 2)")
    serve.set_defaults(run=cmd_serve)

    db = commands.add_parser("db", help="apply or undo the schema").add_subparsers(dest="db_command", required=True)
    migrate = db.add_parser("migrate", help="apply db/schema.sql")
    migrate.add_argument("--shim", action="store_true", help="apply db/supabase_shim.sql first (never on Supabase)")
    migrate.add_argument("--backup-dir", help="pg_dump --schema-only into this folder first")
    migrate.set_defaults(run=cmd_db_migrate)
    rollback = db.add_parser("rollback", help="apply db/rollback.sql")
    rollback.add_argument("--yes", action="store_true", help="confirm dropping the tables")
    rollback.set_defaults(run=cmd_db_rollback)

    send = commands.add_parser("send", help="sign and POST a realistic event (a local `stripe trigger`)")
    send.add_argument("type", help="event type, e.g. customer.created")
    send.add_argument("--url", help="where to POST (default: http://127.0.0.1:PORT/webhooks/stripe)")
    send.add_argument("--customer-id", help="the customer's cus_… id (default: a new one)")
    send.add_argument("--email", help="the customer's email")
    send.add_argument("--name", help="the customer's name")
    send.add_argument("--user-id", help="the auth.users id: metadata.user_id, or a checkout's client_reference_id")
    send.add_argument("--created", type=int, help="unix seconds (default: now)")
    send.set_defaults(run=cmd_send)

    replay = commands.add_parser("replay", help="run events through the consumer again")
    replay.add_argument("--status", choices=["failed", "received", "stale", "ignored"], help="default: failed")
    replay.add_argument("--event", help="one stored event, evt_…")
    replay.add_argument("--since", type=duration, help="received within this window (24h); with --from-stripe, 72h")
    replay.add_argument("--from-stripe", action="store_true", help="fetch from Stripe the events the log lacks")
    replay.set_defaults(run=cmd_replay)

    add_commands(commands, duration)

    support = commands.add_parser("support-user", help="print a SUPPORT_USERS entry (asks for the password twice)")
    support.add_argument("name", help="the person's sign-in name (letters, digits, _ . @ -)")
    support.set_defaults(run=cmd_support_user)

    ensure = commands.add_parser("ensure-customer", help="print (creating if needed) a user's Stripe customer")
    ensure.add_argument("--user-id", required=True, type=_user_id)
    ensure.set_defaults(run=cmd_ensure_customer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[Settings, argparse.Namespace], int] = args.run
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(settings, args)
    except (ConfigError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except stripe.AuthenticationError as error:
        print(f"error: {stripe_api.explain(error)}; check STRIPE_API_KEY", file=sys.stderr)
        return EXIT_USAGE
    except stripe.StripeError as error:
        print(f"error: {stripe_api.explain(error)}", file=sys.stderr)
        return EXIT_FAILURES
    except stripe_api.StripeUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURES
    except (DatabaseUnavailable, SQLAlchemyError) as error:
        where = f" ({describe_target(settings.database_url)})" if settings.database_url else ""
        print(f"error: database{where}: {describe(error)}", file=sys.stderr)
        return EXIT_FAILURES
