"""What every command shares: the exit codes, the usage error, argument types, the commands'
engine and their progress bars."""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeAlias

from sqlalchemy import Engine
from tqdm import tqdm

from webhook import embedded
from webhook.config import Settings, parse_duration
from webhook.database import make_engine

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2  # every command: done, failures or drift found, bad usage
# What each module adds its commands to (subscriptable for the type checker only).
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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


def user_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


def engine_for(settings: Settings) -> Engine:
    """The commands' engine. Their statements read whole tables at times (verify at a million
    rows): bounded, but by a minute rather than a delivery's seconds."""
    return make_engine(
        embedded.database_url(settings), pool_size=2, statement_timeout="60s", free_tier=settings.free_tier
    )


@contextmanager
def progress_bar(what: str, unit: str) -> Iterator[Callable[..., None]]:
    """update(done, total) for a job's progress: a bar on a terminal, nothing otherwise."""
    bar = tqdm(desc=what, unit=f" {unit}", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)

    def update(done: int, total: int | None = None) -> None:
        if total is not None:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()
