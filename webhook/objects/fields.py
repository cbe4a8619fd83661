"""Reading a Stripe object's fields, as every declared object's `state` does: ids checked against
their pattern (a bad one is a bad delivery, answered 400), and anything of the wrong type taken as
absent rather than trusted."""

from __future__ import annotations

import re
from typing import Any

from webhook.objects.base import CUSTOMER_ID, BadCustomerId, BadObjectId


def customer_id(value: Any) -> str:
    """A cus_… id from a bare id, or the object when the field was expanded."""
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or CUSTOMER_ID.fullmatch(value) is None:
        raise BadCustomerId("the event names no cus_… customer id")
    return value


def object_id(value: Any, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise BadObjectId(f"the event names no {what} id")
    return value


def optional_id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
