"""What every Stripe object declares, once, and what every declared object shares.

A `StripeObject` names its id's shape, its table, the snapshot event types it handles (each with
the function turning `data.object` into its typed change), its thin event types, how Stripe is
read for it (one object by id, or a listing for backfill and reconciliation), which fields
reconciliation compares, and its link in Stripe's dashboard. Everything that handles objects
(process.py, refetch.py, thin.py, batch.py, backfill.py, reconcile.py, the console)
loops over the registry in webhook/objects/__init__.py and names none of them.

Reads go through a `Reader`, whatever the caller: a thin notification's background read (with its
context, on the shared rate budget), a tie's bounded read while a delivery waits, or a command's
read with retries. One path for a payload and a read: an event's `data.object` and the object a
read returns become the same change through the same function (`state`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import stripe

from webhook.config import Keys
from webhook.signature import RejectedDelivery

CUSTOMER_ID = re.compile(r"cus_[a-zA-Z0-9]+")  # stripe_customers' valid_stripe_id CHECK


class BadObjectId(RejectedDelivery):
    """An event whose object (or its customer) has no well-formed id: bad input, answered 400."""


class BadCustomerId(BadObjectId):
    """The event's customer is not a cus_… id."""


@dataclass(frozen=True, kw_only=True)
class Change:
    """What an event (or a read of Stripe) asks of one object's row, as the statement that applies
    it reads it: a JSON object whose `object` names the declared object, hence its apply function."""

    object: ClassVar[str]
    id: str
    as_of: int | None = None  # unix time of the Stripe read this state comes from (not an event's)
    tie: str | None = None  # "unsettled": apply over a same-second tie nothing could order

    @property
    def customer(self) -> str:
        """The customer whose timeline the change belongs to (and whose lock orders batches)."""
        return self.id

    @property
    def deletes(self) -> bool:
        return False

    @property
    def links_only(self) -> bool:
        """It carries no state of the object, only a link to make (a completed checkout)."""
        return False

    @property
    def complete(self) -> bool:
        """False when the payload held only part of the object (a first page): the rest is read."""
        return True

    def compared_value(self, label: str) -> Any:
        """The value reconciliation compares under a label of its object's `compared`: the field
        of that name, unless the change says otherwise."""
        return getattr(self, label)

    def incomplete(self, why: str) -> Change:
        """The change stored as far as it goes, saying why the rest is missing."""
        raise NotImplementedError(f"{self.object} changes are always complete")

    def as_json(self) -> dict[str, Any]:
        # A shallow copy: asdict() deep-copies the metadata, on every event, for json.dumps to read.
        return {**vars(self), "object": self.object, "customer": self.customer}


@dataclass(frozen=True, kw_only=True)
class OwnedChange(Change):
    """A change of an object that belongs to a customer, named apart from its own id."""

    customer_id: str  # cus_…; "" for one that names none any more (detached, deleted)

    @property
    def customer(self) -> str:
        return self.customer_id


@dataclass(frozen=True, kw_only=True)
class RemovableChange(OwnedChange):
    """An owned object that Stripe can take away (detached, deleted): then its row goes too."""

    action: Literal["upsert", "delete"] = "upsert"

    @property
    def deletes(self) -> bool:
        return self.action == "delete"


class Reader(Protocol):
    """GET one path of Stripe's API: the JSON object and Stripe's clock (the answer's Date, unix
    seconds). Raises stripe.StripeError (a 404 too) as the caller's client does."""

    def __call__(self, path: str, query: Mapping[str, Any]) -> tuple[dict[str, Any], int]: ...


def listed(read: Reader, path: str, query: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every item of a Stripe list, page after page (100 at a time), in Stripe's order."""
    after: str | None = None
    while True:
        page, _ = read(path, {**query, "limit": 100, **({"starting_after": after} if after else {})})
        items = [item for item in page.get("data") or [] if isinstance(item, dict)]
        yield from items
        if not page.get("has_more") or not items:
            return
        after = str(items[-1].get("id"))


Handler = Callable[[dict[str, Any], Keys], Change | None]


@dataclass(frozen=True)
class StripeObject:
    """One Stripe object, declared once (see the module's docstring)."""

    name: str  # the change's `object`, the tombstone's and the audit's, public.stripe_apply_<name>
    plural: str  # as commands count them: "customers", "entitlement sets"
    id: re.Pattern[str]
    table: str
    column: str  # the table's column holding the Stripe id
    events: Mapping[str, Handler]  # snapshot event type -> its change (None: nothing to apply)
    thin: tuple[str, ...]  # thin types it reads for: exact, or a prefix ending in '.'
    # One object as Stripe has it now, as its change stamped with Stripe's clock (a deleted or
    # detached one as its deletion): read(reader, id, keys).
    read: Callable[[Reader, str, Keys], Change]
    # Backfill and reconciliation: every object of the account ('account'), or each customer's.
    scope: Literal["account", "customer"]
    # Stripe's listing as changes: list_all(reader, keys) for 'account', list_of(reader, customer, keys) for 'customer'.
    listing: Callable[..., Iterator[Change]]
    # Reconciliation: the fields compared (Change.compared_value), and the rows here with them
    # under the same labels (id, customer, then the labels) from `local_sql`.
    compared: tuple[str, ...]
    local_sql: str
    dashboard: str  # path under https://dashboard.stripe.com/[test/], with {id} and {customer}
    # The change of an object Stripe no longer has (None: Stripe keeps them, never deleted here).
    gone: Callable[[str], Change] | None = None
    # STRIPE_REFETCH=always reads it afresh for every event (the contract's customer events).
    refetch_always: bool = False
    # A thin notification names the object to read (related_object); one that names none reads
    # the event itself to find it (entitlement summaries name their customer there).
    thin_names: Callable[[Reader, str], str] | None = None
    # Its rows belong to a customer: a customer with any of them is one whose objects backfill reads.
    of_customer: bool = True
    thin_prefixes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "thin_prefixes", tuple(t for t in self.thin if t.endswith(".")))

    def read_known(self, reader: Reader, stripe_id: str, keys: Keys) -> Change | None:
        """`read`, or None when Stripe answers 404: it has no such object for this key (a deleted
        one it still knows is read as its deletion)."""
        try:
            return self.read(reader, stripe_id, keys)
        except stripe.InvalidRequestError as error:
            if error.http_status != 404:
                raise
            return None

    def reads_thin(self, event_type: str) -> bool:
        return event_type in self.thin or event_type.startswith(self.thin_prefixes)

    def dashboard_url(self, stripe_id: str, customer: str, livemode: bool) -> str:
        path = self.dashboard.format(id=stripe_id, customer=customer)
        return f"https://dashboard.stripe.com/{'' if livemode else 'test/'}{path}"
