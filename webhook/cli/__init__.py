"""`python -m webhook …` / `stripe-webhook …`: run, migrate, and operate the consumer. The commands
live by subject (server.py, events.py, people.py); every expected error becomes one line on stderr
and its exit code here: 0 done, 1 the work found failures or drift, 2 bad usage or configuration."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import stripe
from sqlalchemy.exc import SQLAlchemyError

from webhook import stripe_api
from webhook.cli import events, people, server
from webhook.cli.common import EXIT_FAILURES, EXIT_USAGE, UsageError
from webhook.config import ConfigError, Settings, load_settings
from webhook.database import describe_target
from webhook.process import DatabaseUnavailable, describe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stripe-webhook", description="Stripe customer webhook consumer")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (server, events, people):
        module.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[Settings, argparse.Namespace], int] = args.run
    try:
        # `send` signs with the server's secret: it must not make one of its own where none is kept.
        settings = load_settings(make_secret=not getattr(args, "finds_secret", False))
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
