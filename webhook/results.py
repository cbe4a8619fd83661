"""What the database says an event came to, typed: the batch statement returns one row per event
(status, settled_by, sqlstate, message), read here once, never as strings to split."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import psycopg2.errors


class Source(StrEnum):
    """Where the state applied to a row came from: its sync.source."""

    WEBHOOK = "webhook"
    REPLAY = "replay"
    BACKFILL = "backfill"
    API = "api"  # a read of the Stripe API (a tie's third rule, verify --fix, re-sync, ensure-customer)
    THIN = "thin"  # the read a thin event (an event destination's notification) asked for


class Status(StrEnum):
    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    STALE = "stale"
    TIE = "tie"  # nothing written: neither the type nor previous_attributes ordered a same-second pair


class SettledBy(StrEnum):
    """The rule that ordered a same-second pair of events of one object."""

    TYPE = "type"
    PREVIOUS_ATTRIBUTES = "previous_attributes"
    STRIPE = "stripe"
    UNSETTLED = "unsettled"


@dataclass(frozen=True)
class Applied:
    status: Status
    settled_by: SettledBy | None = None


class EventFailed(Exception):
    """The batch statement caught this event's error (the others of its statement were applied)."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.pgcode = sqlstate  # as on psycopg2's errors: database.busy() reads it
        self.message = message

    def describe(self) -> str:
        try:
            name = psycopg2.errors.lookup(self.pgcode).__name__
        except KeyError:
            name = "DatabaseError"
        return f"{name}: {self.message}"


def from_row(
    status: str | None, settled_by: str | None, sqlstate: str | None, message: str | None
) -> Applied | EventFailed:
    if sqlstate is not None:
        return EventFailed(sqlstate, message or "")
    assert status is not None
    return Applied(Status(status), None if settled_by is None else SettledBy(settled_by))
