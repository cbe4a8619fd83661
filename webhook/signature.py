"""The webhook's trust boundary: check the Stripe-Signature, then turn the body into an Event."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import stripe
from stripe.v2.core import EventNotification

# Parses notifications only (no request is made with it): the library wants a client for the
# context it carries.
_PARSER = stripe.StripeClient("sk_parse_only")
# stripe's attributes load lazily through its module __getattr__, an import lookup on every use.
_verify_header = stripe.WebhookSignature.verify_header


class RejectedDelivery(Exception):
    """A delivery answered 400. The message is safe to return: no secret, signature or payload."""


@dataclass(frozen=True)
class RelatedObject:
    """What a thin event names: the object to read from Stripe (only a /v1/… path is ever read)."""

    id: str
    type: str
    url: str


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    created: int  # unix seconds: Stripe's only ordering key
    livemode: bool
    object: dict[str, Any]  # data.object; {} for a thin event
    payload: str  # the verified body as JSON text, stored as it came
    thin: bool = False  # an event destination's thin notification (object v2.core.event)
    related: RelatedObject | None = None  # a thin event's related_object
    context: str | None = None  # a thin event's context (sent as Stripe-Context when reading)


def verify_signature(body: bytes, header: str | None, secrets: Sequence[str], tolerance: int) -> None:
    """Accept the body if any configured secret signed it within tolerance.

    Several secrets are allowed at once: a rotated dashboard secret beside its successor, or a
    `stripe listen` secret beside the endpoint's.
    """
    if not header:
        raise RejectedDelivery("missing Stripe-Signature header")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RejectedDelivery("body is not UTF-8") from None
    # The library checks only the age; a timestamp from the future would let a captured signature
    # be replayed for as long as it stays ahead. Outside the tolerance either way is refused.
    timestamp = _timestamp(header)
    if timestamp is not None and timestamp > time.time() + tolerance:
        raise RejectedDelivery("signature timestamp outside the tolerance")
    too_old = False
    for secret in secrets:
        try:
            _verify_header(text, header, secret, tolerance)
            return
        except stripe.SignatureVerificationError as error:
            # The library raises this message only after the signature itself matched.
            too_old = too_old or str(error.user_message or "").startswith("Timestamp outside")
    if too_old:
        raise RejectedDelivery("signature timestamp outside the tolerance")
    raise RejectedDelivery("no valid signature for any configured secret")


def _timestamp(header: str) -> int | None:
    """The header's `t`; RejectedDelivery when a `t` is not ASCII digits (the library would call
    int() on it: '²' passes str.isdigit() and then fails there)."""
    found = None
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            if not (value.isascii() and value.isdigit()):
                raise RejectedDelivery("malformed Stripe-Signature header")
            found = int(value) if found is None else found
    return found


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON, and Postgres' jsonb would refuse them after the fact.
    raise ValueError(name)


# A thin event's related object is read from the configured Stripe API base: a relative /v1/ path
# of ids only (a /v2/ one, as a ping's event destination, is never read), never a host, a query or
# a way out of the path.
RELATED_URL = re.compile(r"/v[12]/[A-Za-z0-9_]+(/[A-Za-z0-9_][A-Za-z0-9_.]*)*")


def _thin(document: dict[str, Any], text: str) -> Event:
    """A thin notification, parsed by the stripe library's event-notification support."""
    try:
        notification = EventNotification.from_json(document, _PARSER)
        created = int(datetime.fromisoformat(str(notification.created).replace("Z", "+00:00")).timestamp())
    except (KeyError, TypeError, ValueError):
        raise RejectedDelivery("body is not a Stripe event notification (needs id evt_…, type, created)") from None
    if not str(notification.id).startswith("evt_") or not notification.type:
        raise RejectedDelivery("body is not a Stripe event notification (needs id evt_…, type, created)")
    related = document.get("related_object")
    found = None
    if isinstance(related, dict):
        url, related_id, related_type = related.get("url"), related.get("id"), related.get("type")
        if not (isinstance(url, str) and RELATED_URL.fullmatch(url) and isinstance(related_id, str)):
            raise RejectedDelivery("the notification's related object is not a /v1/ path of this Stripe API")
        found = RelatedObject(related_id, str(related_type), url)
    context = document.get("context")
    return Event(
        id=notification.id,
        type=notification.type,
        created=created,
        livemode=notification.livemode,
        object={},
        payload=text,
        thin=True,
        related=found,
        context=context if isinstance(context, str) and context else None,
    )


def parse_event(body: bytes | str) -> Event:
    """Parse a verified body once; reject anything that is not the shape of a Stripe event, or of
    an event destination's thin notification (told apart by `object`)."""
    try:
        document = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RejectedDelivery("body is not JSON") from None
    if not isinstance(document, dict):
        raise RejectedDelivery("body is not a Stripe event")
    if document.get("object") == "v2.core.event":
        text = body if isinstance(body, str) else body.decode("utf-8")
        return _thin(document, text.removeprefix("\ufeff"))
    event_id, event_type, created = document.get("id"), document.get("type"), document.get("created")
    data = document.get("data")
    event_object = data.get("object") if isinstance(data, dict) else None
    if (
        not isinstance(event_id, str)
        or not event_id.startswith("evt_")
        or not isinstance(event_type, str)
        or not event_type
        or not isinstance(created, int)
        or isinstance(created, bool)
        or created < 0
        or not isinstance(event_object, dict)
    ):
        raise RejectedDelivery("body is not a Stripe event (needs id evt_…, type, created, data.object)")
    text = body if isinstance(body, str) else body.decode("utf-8")
    # A byte order mark is not JSON, and jsonb refuses it; the document after it is the event.
    text = text.removeprefix("\ufeff")
    return Event(
        id=event_id,
        type=event_type,
        created=created,
        livemode=document.get("livemode") is True,
        object=event_object,
        payload=text,
    )
