"""The events' commands: replay (stored, or from Stripe), backfill, verify, prune and heal. On a
terminal the long ones show a progress bar (tqdm, on stderr); their summary lines go to stdout."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from datetime import UTC, datetime

import stripe
from sqlalchemy import Engine

from webhook import budget, stripe_api, thin_queue
from webhook.backfill import backfill
from webhook.cli.common import (
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_USAGE,
    Commands,
    UsageError,
    duration,
    engine_for,
    progress_bar,
)
from webhook.config import Settings
from webhook.heal import Healer
from webhook.logs import configure_logging, log
from webhook.prune import PruneRefused, prune
from webhook.reconcile import FixRefused, check_fix, find_drift, fix_drift
from webhook.replay import ReplaySummary, replay_from_stripe, replay_stored

STOP_GRACE_SECONDS = 3.0


def add_commands(commands: Commands) -> None:
    replay = commands.add_parser("replay", help="run events through the consumer again")
    replay.add_argument("--status", choices=["failed", "received", "stale", "ignored"], help="default: failed")
    replay.add_argument("--event", help="one stored event, evt_…")
    replay.add_argument("--since", type=duration, help="received within this window (24h); with --from-stripe, 72h")
    replay.add_argument("--from-stripe", action="store_true", help="fetch from Stripe the events the log lacks")
    replay.set_defaults(run=cmd_replay)

    backfill_parser = commands.add_parser(
        "backfill",
        help="upsert every Stripe customer, then subscriptions, payment methods and entitlements, and open "
        "invoices (never over a newer event; resumes a stopped run)",
    )
    backfill_parser.add_argument(
        "--from-start", action="store_true", help="ignore where a stopped run got to and list every customer again"
    )
    backfill_parser.add_argument(
        "--invoices-since",
        type=_day,
        metavar="YYYY-MM-DD",
        help="every invoice created since that day (UTC), not only the open ones",
    )
    backfill_parser.set_defaults(run=cmd_backfill)

    verify = commands.add_parser("verify", help="compare every row with Stripe; exit 1 on drift")
    verify.add_argument("--fix", action="store_true", help="apply Stripe's state to drifted rows")
    verify.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="with --fix, delete rows even when more than a tenth of them look gone from Stripe",
    )
    verify.set_defaults(run=cmd_verify)

    prune_parser = commands.add_parser("prune", help="delete settled events older than the retention")
    prune_parser.add_argument("--older-than", type=duration, help="default: EVENT_RETENTION_DAYS (90) days")
    prune_parser.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    prune_parser.set_defaults(run=cmd_prune)

    heal = commands.add_parser("heal", help="recover missed events, fix drift and prune, for ever (a Procfile line)")
    heal.add_argument("--once", action="store_true", help="one round, then exit (cron, tests)")
    heal.set_defaults(run=cmd_heal)


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


def _budgeted(settings: Settings) -> tuple[Engine, stripe.StripeClient]:
    """The database, and a Stripe client that shares the deployment's read budget."""
    engine = engine_for(settings)
    return engine, stripe_api.make_client(settings, budget.shared(engine, settings.stripe_api_rate))


def _day(text: str) -> int:
    """A YYYY-MM-DD day as the unix time of its start (UTC)."""
    try:
        return int(datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day like 2026-11-01") from None


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    engine, client = _budgeted(settings)
    started = time.monotonic()
    with progress_bar("backfill", "customers") as update:
        since = {"invoice": args.invoices_since} if args.invoices_since is not None else {}
        run = backfill(engine, client, settings.keys, update, args.from_start, since)
    print(f"{run.summary()} in {time.monotonic() - started:.1f}s")
    if run.failed is not None:
        where = f"after {run.stopped_after}" if run.stopped_after else "where this one started"
        print(f"error: {stripe_api.explain(run.failed)}; run backfill again to resume {where}", file=sys.stderr)
        return EXIT_USAGE if isinstance(run.failed, stripe.AuthenticationError) else EXIT_FAILURES
    return EXIT_OK


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    engine, client = _budgeted(settings)
    as_of = int(time.time())
    with progress_bar("verify: listing Stripe's customers", "customers") as update:
        checked, drifts = find_drift(engine, client, settings.keys, update)
    for drift in drifts:
        print(drift.line())
    print(f"checked {checked} rows: {len(drifts)} drifted")
    if args.fix and drifts:
        assert settings.stripe_api_key is not None  # make_client required it
        try:
            check_fix(engine, settings.stripe_api_key, checked, drifts, args.allow_mass_delete)
        except FixRefused as refusal:
            print(f"error: verify --fix refused: {refusal}; nothing changed", file=sys.stderr)
            return EXIT_FAILURES
        outcomes = fix_drift(engine, drifts, as_of)
        print(f"fixed {outcomes.count('processed')} of {len(drifts)} (the rest changed by newer events meanwhile)")
        return EXIT_OK
    return EXIT_FAILURES if drifts else EXIT_OK


def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    days = settings.event_retention_days
    if args.older_than is None and days == 0:
        print("EVENT_RETENTION_DAYS is 0: every event is kept; nothing pruned")
        return EXIT_OK
    older_than = args.older_than if args.older_than is not None else days * 86400
    try:
        with progress_bar("prune", "events") as update:
            pruned = prune(engine_for(settings), older_than, dry_run=args.dry_run, progress=update)
    except PruneRefused as refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    print(pruned.line())
    return EXIT_OK


def cmd_heal(settings: Settings, args: argparse.Namespace) -> int:
    configure_logging()
    engine, client = _budgeted(settings)
    healer = Healer(engine, settings, client)
    if args.once:
        # Thin notifications waiting for a read, as every serve process reads them.
        taken = thin_queue.Reader(engine, settings, budget.shared(engine, settings.stripe_api_rate)).drain()
        if taken:
            print(f"thin notifications: read {taken} objects")
        result = healer.run_round()
        if result is None:
            print("another heal process holds the lease; nothing done")
            return EXIT_OK
        print(result.line())
        return EXIT_FAILURES if result.error else EXIT_OK
    stop = thin_queue.start(engine_for(settings), settings)  # its own connections beside the rounds'
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # The rounds run beside this thread, which only waits for a signal: a round waiting on a slow
    # Stripe (up to three 10 s tries a call) must not hold up a stop. A round still running a few
    # seconds after it is abandoned, as a killed process would abandon it; its lease is released
    # so that another heal process can take over at once, and the round stays due.
    rounds = threading.Thread(target=healer.run_forever, args=(stop,), name="heal-rounds", daemon=True)
    rounds.start()
    while not stop.wait(1) and rounds.is_alive():
        pass
    rounds.join(STOP_GRACE_SECONDS)
    if rounds.is_alive():
        log(logging.WARNING, "heal stopped mid-round; the round is abandoned and stays due", holder=healer.holder)
        healer.release_lease()
    return EXIT_OK
