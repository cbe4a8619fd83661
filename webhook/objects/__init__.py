"""The registry: every Stripe object the consumer keeps, each declared once in a module of its own
(webhook/objects/base.py says what a declaration holds). Mechanisms loop over OBJECTS; adding an
object is a module here, its line below, and its apply function in SQL (docs/architecture.md)."""

from __future__ import annotations

from webhook.objects.base import BadCustomerId, BadObjectId, Change, Handler, Reader, StripeObject
from webhook.objects.customer import CUSTOMER
from webhook.objects.entitlements import ENTITLEMENTS
from webhook.objects.invoice import INVOICE
from webhook.objects.payment_method import PAYMENT_METHOD
from webhook.objects.subscription import SUBSCRIPTION

# In dependency order: backfill lists customers first, and the objects of customers after.
OBJECTS: tuple[StripeObject, ...] = (CUSTOMER, SUBSCRIPTION, ENTITLEMENTS, PAYMENT_METHOD, INVOICE)
BY_NAME: dict[str, StripeObject] = {declared.name: declared for declared in OBJECTS}

# Every snapshot event type a declared object handles; any other type is logged as ignored.
HANDLERS: dict[str, Handler] = {
    event_type: handler for declared in OBJECTS for event_type, handler in declared.events.items()
}


def of(change: Change) -> StripeObject:
    return BY_NAME[change.object]


def reading_thin(event_type: str) -> StripeObject | None:
    """The object a thin notification's type asks to read, if any."""
    return next((declared for declared in OBJECTS if declared.reads_thin(event_type)), None)


__all__ = ["BY_NAME", "HANDLERS", "OBJECTS", "BadCustomerId", "BadObjectId", "Change", "Reader", "StripeObject"]
