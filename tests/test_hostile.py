"""Hostile and malformed deliveries: each gets its documented answer, writes nothing it should not,
and leaks nothing in the answer or the logs."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from tests.support import SECRET, count, deliver, event_row, failing_writes, sign
from webhook import samples
from webhook.logs import LOGGER, JsonFormatter
from webhook.objects import HANDLERS

WRITTEN = "SELECT (SELECT count(*) FROM stripe_webhook_events) + (SELECT count(*) FROM stripe_customers)"
EMAIL = "private.person@example.com"
fixture_ok = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _post(client: FlaskClient, body: bytes | str, header: str | None) -> Any:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Stripe-Signature"] = header
    return client.post("/webhooks/stripe", data=body, headers=headers)


def _event_body() -> str:
    return json.dumps(samples.event("customer.created", samples.customer(email=EMAIL)))


def _leaks(answer: Any) -> bool:
    text = answer.get_data(as_text=True)
    return EMAIL in text or "whsec_" in text or "v1=" in text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@fixture_ok
@given(document=json_values)
def test_signed_json_that_is_not_an_event_is_a_400(client: FlaskClient, engine: Engine, document: Any) -> None:
    body = json.dumps(document)
    answer = _post(client, body, sign(body))
    assert answer.status_code == 400 and set(answer.get_json()) == {"error"}
    assert count(engine, WRITTEN) == 0


# What each handled type needs of data.object to be applied, written out here (the model), apart
# from the handlers under test: the field that must hold its own kind of id, and any other.
_NEEDS = {
    "customer.": {"id": "cus"},
    "customer.subscription.": {"id": "sub", "customer": "cus", "status": "status"},
    "payment_method.": {"id": "pm", "customer": "cus"},
    "payment_method.detached": {"id": "pm"},  # detached, it names no customer
    "entitlements.active_entitlement_summary.": {"customer": "cus"},
    "invoice.": {"id": "in", "customer": "cus", "status": "invoice status"},
    "invoice.deleted": {"id": "in"},  # a deleted draft is found by its own id
    # Links a user or organization it names; these name neither (keys here are too short to be
    # client_reference_id or metadata.organization_id), so whatever its customer: nothing to do.
    "checkout.session.completed": {},
}


def _needs(event_type: str) -> dict[str, str] | None:
    found = [needs for prefix, needs in _NEEDS.items() if event_type.startswith(prefix)]
    return None if event_type not in HANDLERS else found[-1]  # the longest prefix is listed last


def _filled(kind: str, good: bool, anything: Any) -> Any:
    if kind == "status":
        return "active" if good else "frozen"
    if kind == "invoice status":
        return "open" if good else "frozen"
    return samples.stripe_id(kind) if good else anything


@fixture_ok
@given(
    event_type=st.one_of(st.sampled_from(sorted(HANDLERS)), st.text(min_size=1, max_size=40)),
    data_object=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    broken=st.one_of(st.none(), st.text(max_size=12)),  # the field left bad, if any
    bad_value=st.one_of(st.none(), st.text(max_size=12), st.integers()),
)
def test_signed_event_shapes_get_the_answer_their_shape_asks_for(
    client: FlaskClient, engine: Engine, event_type: str, data_object: dict[str, Any], broken: Any, bad_value: Any
) -> None:
    """Whatever else an object holds, a handled type with its ids is applied (200) and one without
    is refused (400), nothing written; any other type is logged as ignored. Never a 500."""
    needs = _needs(event_type)
    fields = sorted(needs or {})
    spoiled = fields[hash(broken) % len(fields)] if fields and broken is not None else None
    if spoiled is not None and isinstance(bad_value, str) and bad_value.startswith(("cus_", "sub_", "pm_")):
        bad_value = "x" + bad_value  # a well-formed id is not a bad value
    made = {field: _filled(kind, field != spoiled, bad_value) for field, kind in (needs or {}).items()}
    event = samples.event(event_type, {**data_object, **made})
    answer = deliver(client, event)
    logged = event_row(engine, event["id"])
    if needs is None:
        expected = (200, "ignored")
    elif spoiled is not None:
        expected = (400, None)
    elif not fields:
        expected = (200, "ignored")
    else:
        expected = (200, "processed")
    assert (answer.status_code, answer.get_json().get("status")) == expected, answer.get_json()
    assert (logged is None) == (expected[0] == 400)
    if logged is not None:
        assert logged["status"] == expected[1]


@pytest.mark.parametrize(
    "body",
    [b"", b"\xff\xfe\xfa not utf-8", b"[" * 100_000 + b"]" * 100_000, b'{"id": "evt_1"', b"null"],
    ids=["empty", "not-utf8", "deeply-nested", "truncated", "null"],
)
def test_malformed_bodies_are_400(client: FlaskClient, engine: Engine, body: bytes) -> None:
    header = sign(body.decode("utf-8", "replace"))
    answer = _post(client, body, header)
    assert answer.status_code == 400 and not _leaks(answer)
    assert count(engine, WRITTEN) == 0


def test_ten_megabytes_is_413(client: FlaskClient, engine: Engine) -> None:
    body = b'{"id": "evt_big", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    assert _post(client, body, sign(body.decode())).status_code == 413
    assert count(engine, WRITTEN) == 0


def test_no_secret_signature_or_email_in_any_log_line(client: FlaskClient, engine: Engine) -> None:
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(JsonFormatter())
    LOGGER.addHandler(handler)
    good = samples.event("customer.created", samples.customer(email=EMAIL, name="Private Person"))
    signed = sign(json.dumps(good))
    deliver(client, good)
    deliver(client, good)  # duplicate
    _post(client, json.dumps(good), sign(json.dumps(good), secret="whsec_wrong_secret_value"))
    with failing_writes(engine, "public.stripe_customers", "BEFORE"):
        deliver(client, samples.event("customer.created", samples.customer(email=EMAIL)))  # 500
    LOGGER.removeHandler(handler)

    logged = captured.getvalue()
    lines = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    assert {line["outcome"] for line in lines if "outcome" in line} >= {"processed", "duplicate"}
    assert any(line.get("msg") == "event failed" for line in lines)
    handled = next(line for line in lines if line.get("outcome") == "processed")
    assert set(handled) >= {"event_id", "type", "outcome", "stripe_customer_id", "latency_ms"}
    for secret_text in (EMAIL, "Private Person", SECRET, "whsec_", signed.split(",")[1][3:]):
        assert secret_text not in logged
