"""Reconciliation (`verify [--fix]`, heal's drift round, the console's re-sync): every declared
object's rows here against Stripe, by the fields each declares it compares.

Objects of the whole account are listed once (100 a page) rather than read one by one; objects
listed per customer are listed for each customer that has some here. A row Stripe's listing lacks
is read by itself: Stripe answering 404 makes it `missing`, Stripe saying it is deleted (or
detached) `deleted`. Fixing applies Stripe's state through the ordering rules (sync.source 'api'),
deleting only what the object declares Stripe can take away, and only when the deletions are
plausible: the same check on every path that deletes."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import stripe
from sqlalchemy import Engine

from webhook import objects, objects_store, stripe_api
from webhook.config import Keys
from webhook.objects import Change, Reader, StripeObject
from webhook.results import Source

# Drift lines name the object, except for the first declared (customers), whose lines have
# always read "drift cus_…: …".
_UNNAMED = objects.OBJECTS[0].name


class DriftKind(StrEnum):
    MISSING = "missing"  # Stripe does not know it
    DELETED = "deleted"  # Stripe has it as deleted (or, a payment method, detached)
    CHANGED = "changed"  # compared fields differ
    UNLINKED = "unlinked"  # a user (or organization) no customer holds while this one names it


@dataclass(frozen=True)
class Drift:
    stripe_id: str
    kind: DriftKind
    fields: tuple[str, ...] = ()
    fix: Change | None = None  # Stripe's state to apply; None: reported only
    object: str = _UNNAMED

    @property
    def deletes(self) -> bool:
        return self.fix is not None and self.fix.deletes

    def line(self) -> str:
        detail = f" ({', '.join(self.fields)} differ)" if self.fields else ""
        what = "" if self.object == _UNNAMED else f"{self.object} "
        return f"drift {what}{self.stripe_id}: {self.kind}{detail}"


Local = Mapping[str, tuple[str, dict[str, Any]]]  # id -> (customer, compared fields)


def find_drift(
    engine: Engine,
    client: stripe.StripeClient,
    keys: Keys,
    progress: Callable[[int], None] = lambda listed: None,
) -> tuple[int, list[Drift]]:
    """Compare every local row of every declared object with Stripe: (rows checked, drifts)."""
    reader = stripe_api.reader(client)
    checked, drifts = 0, []
    for declared in objects.OBJECTS:
        with engine.connect() as connection:
            local = objects_store.local_rows(connection, declared)
        checked += len(local)
        if declared.scope == "account":
            remote: dict[str, Change] = {}
            for change in declared.listing(reader, keys):
                remote[change.id] = change
                progress(len(remote))
            drifts += _compared(declared, reader, keys, local, remote, whole_scope=False)
            continue
        for customer in sorted({owner for owner, _ in local.values()}):
            theirs = {stripe_id: row for stripe_id, row in local.items() if row[0] == customer}
            listed = {change.id: change for change in declared.listing(reader, customer, keys)}
            drifts += _compared(declared, reader, keys, theirs, listed, whole_scope=True)
    with engine.connect() as connection:
        orphans = objects_store.relink(connection, fix=False)
    drifts.extend(Drift(customer_id, DriftKind.UNLINKED, (link,)) for link, customer_id in orphans)
    return checked, drifts


def _compared(
    declared: StripeObject, reader: Reader, keys: Keys, local: Local, remote: Mapping[str, Change], whole_scope: bool
) -> list[Drift]:
    """Drift between the rows here and Stripe's listing. whole_scope: the listing is all Stripe has
    of what the rows cover (one customer's), so what it has beyond them is drift too."""
    drifts = []
    for stripe_id in sorted(local):
        change = remote.get(stripe_id)
        if change is None:
            drifts.append(_vanished(declared, reader, keys, stripe_id))
            continue
        differ = _differ(declared, local[stripe_id][1], change)
        if differ:
            drifts.append(Drift(stripe_id, DriftKind.CHANGED, differ, change, declared.name))
    if whole_scope:
        for stripe_id in sorted(remote.keys() - local.keys()):
            drifts.append(
                Drift(
                    stripe_id,
                    DriftKind.CHANGED,
                    _differ(declared, {}, remote[stripe_id]),
                    remote[stripe_id],
                    declared.name,
                )
            )
    return drifts


def _differ(declared: StripeObject, here: Mapping[str, Any], change: Change) -> tuple[str, ...]:
    return tuple(label for label in declared.compared if change.compared_value(label) != here.get(label))


def _vanished(declared: StripeObject, reader: Reader, keys: Keys, stripe_id: str) -> Drift:
    """A row Stripe's listing lacks, read by itself. An object Stripe keeps (a subscription) is
    reported and never deleted."""
    if declared.gone is None:
        return Drift(stripe_id, DriftKind.MISSING, object=declared.name)
    found = declared.read_known(reader, stripe_id, keys)
    if found is None:
        return Drift(stripe_id, DriftKind.MISSING, fix=declared.gone(stripe_id), object=declared.name)
    if found.deletes:
        return Drift(stripe_id, DriftKind.DELETED, fix=found, object=declared.name)
    return Drift(stripe_id, DriftKind.CHANGED, _differ(declared, {}, found), found, declared.name)


class FixRefused(Exception):
    """A fix would do harm: the message says why, and nothing was changed."""


def deletions_plausible(rows: int, deletions: int) -> bool:
    """A key for another account or the other mode makes every row look missing in Stripe; more
    than a tenth of the rows (and more than one) going at once is taken for that."""
    return deletions <= max(1, rows // 10)


def check_mode(engine: Engine, api_key: str) -> None:
    """Refuse to apply Stripe's state read with a key of the other mode than the database's events:
    every row would look missing (and be deleted)."""
    key_livemode = "_live_" in api_key
    with engine.connect() as connection:
        modes = objects_store.recent_livemodes(connection)
    if modes and key_livemode not in modes:
        key_mode, data_mode = ("live", "test") if key_livemode else ("test", "live")
        raise FixRefused(f"STRIPE_API_KEY is a {key_mode}-mode key but this database holds {data_mode}-mode events")


def check_fix(engine: Engine, api_key: str, rows: int, drifts: list[Drift], allow_mass_delete: bool) -> None:
    """Refuse a fix whose key is of the other mode than the database's events, or that would
    delete an implausible share of the rows (unless the operator says so)."""
    check_mode(engine, api_key)
    deletions = sum(1 for drift in drifts if drift.deletes)
    if not allow_mass_delete and not deletions_plausible(rows, deletions):
        raise FixRefused(
            f"would delete {deletions} of {rows} rows, which looks like a key for another account or mode; "
            "check STRIPE_API_KEY, or pass --allow-mass-delete to go on"
        )


def fix_drift(engine: Engine, drifts: list[Drift], as_of: int) -> list[str]:
    """Apply Stripe's state (sync.source 'api'): changed rows take Stripe's values, rows Stripe
    no longer has are deleted (a row an event set after `as_of` is left alone), and a user left
    unlinked is linked to the newest customer that names them."""
    changes = [drift.fix.as_json() for drift in drifts if drift.fix is not None]
    outcomes = objects_store.apply_states(engine, changes, Source.API, as_of) if changes else []
    if any(drift.kind is DriftKind.UNLINKED for drift in drifts):
        with engine.connect() as connection:
            outcomes += ["processed"] * len(objects_store.relink(connection, fix=True))
    return outcomes


def resync(
    engine: Engine,
    client: stripe.StripeClient,
    api_key: str,
    declared: StripeObject,
    stripe_id: str,
    keys: Keys,
    actor: str,
) -> str:
    """Apply Stripe's current state of one object, as `verify --fix` does for a drifted row
    (sync.source 'api'; a row an event set after the read is left alone): 'processed' or 'stale'.
    Refused (FixRefused, nothing changed) with a key of the other mode, and when Stripe does not
    know the object at all: Stripe keeps deleted customers (`deleted: true`), so one the key cannot
    see at all says the key is another account's, not that it is gone."""
    check_mode(engine, api_key)
    as_of = int(time.time())
    change = declared.read_known(stripe_api.reader(client), stripe_id, keys)
    if change is None:
        raise FixRefused(f"Stripe does not know {stripe_id} with this STRIPE_API_KEY (another account or mode?)")
    return objects_store.apply_states(engine, [change.as_json()], Source.API, as_of, actor)[0]
