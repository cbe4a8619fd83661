"""The webhook's trust boundary: check the Stripe-Signature, then turn the body into an Event."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import stripe


class RejectedDelivery(Exception):
    """A delivery answered 400. The message is safe to return: no secret, signature or payload."""


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    created: int  # unix seconds: Stripe's only ordering key
    livemode: bool
    object: dict[str, Any]  # data.object
    payload: str  # the verified body as JSON text, stored as it came


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
            stripe.WebhookSignature.verify_header(text, header, secret, tolerance)
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


def parse_event(body: bytes | str) -> Event:
    """Parse a verified body once; reject anything that is not the shape of a Stripe event."""
    try:
        document = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RejectedDelivery("body is not JSON") from None
    if not isinstance(document, dict):
        raise RejectedDelivery("body is not a Stripe event")
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
