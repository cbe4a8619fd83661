"""The people's commands: support-user (a console sign-in) and ensure-customer (a user's Stripe
customer, made when missing)."""

from __future__ import annotations

import argparse
import getpass
import sys

from werkzeug.security import generate_password_hash

from webhook import stripe_api
from webhook.cli.common import EXIT_FAILURES, EXIT_OK, Commands, UsageError, engine_for, user_id
from webhook.config import SUPPORT_NAME, Settings
from webhook.customers import UnknownUser, ensure_customer


def add_commands(commands: Commands) -> None:
    support = commands.add_parser("support-user", help="print a SUPPORT_USERS entry (asks for the password twice)")
    support.add_argument("name", help="the person's sign-in name (letters, digits, _ . @ -)")
    support.set_defaults(run=cmd_support_user)

    ensure = commands.add_parser("ensure-customer", help="print (creating if needed) a user's Stripe customer")
    ensure.add_argument("--user-id", required=True, type=user_id)
    ensure.set_defaults(run=cmd_ensure_customer)


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


def cmd_ensure_customer(settings: Settings, args: argparse.Namespace) -> int:
    client = stripe_api.make_client(settings)
    try:
        print(ensure_customer(engine_for(settings), client, args.user_id, settings.keys))
    except UnknownUser:
        print(f"error: no auth.users row has id {args.user_id}", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK
