"""The deployment's budget of Stripe reads (STRIPE_API_RATE a second), shared through Postgres by
every process and host: the thin-event readers, heal, backfill and verify.

Stripe's limit is for the whole account, so a per-process limiter would allow as many times the
rate as there are processes. One token bucket in one row, taken from by one statement: the row
lock orders the takers, the database's clock is the only clock, and nothing outlives the statement
(pooler-safe). It holds at most a tenth of the rate beyond the next token, so no one-second window
sees more than STRIPE_API_RATE plus a tenth of it. A 429 empties it for every process at once.
(pyrate-limiter's Postgres bucket counts and then inserts in two statements: two processes can
both pass the count.)
"""

from __future__ import annotations

import contextlib
import random
import time
import weakref
from typing import Any

import psycopg2
import requests
from requests.adapters import HTTPAdapter
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from urllib3.util.retry import Retry

from webhook import database, metrics

_BOUNDED = "SET LOCAL statement_timeout = '2s'; SET LOCAL lock_timeout = '1s'; "
_LEVEL = "least(%(burst)s, b.tokens + extract(epoch FROM clock_timestamp() - b.updated_at) * %(rate)s)"
# A token taken: the row made full on first use, else refilled for the time since and one spent.
_SPEND = (
    _BOUNDED
    + f"""
    INSERT INTO public.stripe_api_budget AS b (name, tokens, updated_at)
    VALUES ('stripe', %(burst)s - 1, clock_timestamp())
    ON CONFLICT (name) DO UPDATE SET tokens = {_LEVEL} - 1, updated_at = clock_timestamp()
    """
)
# ... only when one is there: nothing changes otherwise, and no row comes back.
_TAKE = _SPEND + f" WHERE {_LEVEL} >= 1 RETURNING true"
_WAIT = _BOUNDED + f"SELECT (1 - {_LEVEL}) / %(rate)s FROM public.stripe_api_budget AS b WHERE name = 'stripe'"
_PAUSE = (
    _BOUNDED
    + f"""
    UPDATE public.stripe_api_budget AS b SET tokens = least({_LEVEL}, -%(seconds)s * %(rate)s),
      updated_at = clock_timestamp()
    WHERE name = 'stripe'
    """
)


# A 429 without Retry-After: Stripe's window is a second, and most of it has passed by the time a
# read that ran over it is answered. Half a second, against a whole one, halved the drain of
# 10,000 notifications behind an exactly-as-fast fake Stripe (bench.thin).
PAUSE_SECONDS = 0.5


class Budget:
    """STRIPE_API_RATE reads a second for the deployment, taken from the row in stripe_api_budget."""

    def __init__(self, engine: Engine, rate: int) -> None:
        self.engine = engine
        self.params: dict[str, Any] = {"rate": float(rate), "burst": max(1.0, rate / 10)}

    def _run(self, statement: str, **params: Any) -> Any:
        rows = database.run_raw(self.engine, statement, {**self.params, **params})
        return rows[0][0] if rows else None

    def spend(self) -> None:
        """Take a token now, into debt if none is left: for a read a delivery waits on (a tie's third
        rule), which must not wait or be refused (falling back would leave the tie to the delivery
        order); the debt holds the background readers back until it is paid."""
        metrics.STRIPE_READS.inc()
        with contextlib.suppress(SQLAlchemyError, psycopg2.Error):
            self._run(_SPEND)

    def take(self) -> None:
        """Wait for one read's token."""
        while True:
            try:
                if self._run(_TAKE):
                    return
                wait = self._run(_WAIT) or 0.0
            except (SQLAlchemyError, psycopg2.Error):
                wait = 1.0  # the database is away: what the read found could not be applied anyway
            # A little jitter, so that waiting processes do not all ask at the same instant.
            time.sleep(max(0.005, float(wait)) * (1 + random.random() / 4))

    def pause(self, seconds: float | None) -> None:
        """Stripe answered 429: no process reads for `seconds` from now (PAUSE_SECONDS when Stripe
        did not say); several 429s at once pause as long as the longest, not their sum."""
        metrics.STRIPE_RATE_LIMITED.inc()
        with contextlib.suppress(SQLAlchemyError, psycopg2.Error):  # each process still backs off on its own
            self._run(_PAUSE, seconds=min(60.0, seconds or PAUSE_SECONDS))


def retry_after(headers: Any) -> float | None:
    """Seconds a 429's Retry-After asks for, when it says (at most a minute)."""
    value = (headers.get("Retry-After") or headers.get("retry-after")) if headers else None
    try:
        return None if value is None else min(60.0, max(0.0, float(value)))
    except ValueError:
        return None


_SHARED: weakref.WeakKeyDictionary[Engine, Budget] = weakref.WeakKeyDictionary()


def shared(engine: Engine, rate: int) -> Budget:
    """The engine's budget object (one per engine and process; the budget itself is the row)."""
    found = _SHARED.get(engine)
    if found is None or found.params["rate"] != float(rate):
        found = _SHARED[engine] = Budget(engine, rate)
    return found


class BudgetAdapter(HTTPAdapter):
    """A requests adapter whose every request (pages and the library's retries included) first
    takes a token. A 429 pauses the whole deployment and, as `on_429` says (status: how many times,
    backoff_factor), is sent again after the pause (a request refused with 429 did nothing, so
    repeating it, a POST too, is safe)."""

    def __init__(self, budget: Budget, on_429: Retry | None = None) -> None:
        self.budget, self.on_429 = budget, on_429
        super().__init__()

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        retries = (self.on_429.status or 0) if self.on_429 else 0
        for attempt in range(retries + 1):
            self.budget.take()
            metrics.STRIPE_READS.inc()
            response = super().send(request, *args, **kwargs)
            if response.status_code != 429:
                break
            # Back off as Stripe says, else as on_429's back-off: the next take() waits it out.
            backoff = PAUSE_SECONDS if self.on_429 is None else self.on_429.backoff_factor * 2**attempt
            self.budget.pause(retry_after(response.headers) or min(backoff, 8.0))
            if attempt < retries:
                response.close()
        return response
