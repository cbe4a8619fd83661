"""The Stripe-Signature check (webhook/verify.py), every rule in one place: any configured secret,
the v1 scheme only, the tolerance both ways, ASCII timestamps, and a 400 that writes nothing and
echoes no secret, signature or payload."""

from __future__ import annotations

import json

import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine

from tests.support import SECOND_SECRET, SECRET, count, deliver, now, sign
from tests.test_hostile import WRITTEN, _event_body, _leaks, _post, fixture_ok
from webhook import samples


def _post_headers(client: FlaskClient, body: bytes | str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    answer = client.post("/webhooks/stripe", data=body, headers=headers)
    return answer.status_code, answer.get_json()


# What an HTTP client can send in a header: no CR, LF or NUL (werkzeug refuses them before sending).
HEADER_CHARACTERS = st.characters(blacklist_characters="\r\n\x00")
HEADER_TEXT = st.text(alphabet=HEADER_CHARACTERS, max_size=300)


# Digits Python's int() would take though Stripe never sends them ('١٢٣', '１２', '²'): the one
# class of forged timestamp an ASCII check must catch.
OTHER_DIGITS = st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=12)


@fixture_ok
@given(
    header=st.one_of(
        HEADER_TEXT,
        st.builds(lambda digits: f"t={digits},v1=abc", st.text(alphabet=HEADER_CHARACTERS, max_size=12)),
        st.builds(lambda digits: f"t={digits},v1=abc", OTHER_DIGITS),
    )
)
def test_any_forged_header_is_refused(client: FlaskClient, engine: Engine, header: str) -> None:
    answer = _post(client, _event_body(), header)
    assert answer.status_code == 400 and answer.is_json and not _leaks(answer)
    assert count(engine, WRITTEN) == 0


@pytest.mark.parametrize("timestamp", ["²", "١٢٣", "１２", "12²", "-5", " 1"])
def test_a_timestamp_of_other_digits_is_a_400_not_a_500(client: FlaskClient, engine: Engine, timestamp: str) -> None:
    answer = _post(client, _event_body(), f"t={timestamp},v1=abc")
    assert (answer.status_code, answer.get_json()) == (400, {"error": "malformed Stripe-Signature header"})
    assert count(engine, WRITTEN) == 0


@fixture_ok
@given(junk=st.lists(st.sampled_from(["v1=deadbeef", "v0=abc", "t=1", "v1=", "x=y", "t=", ",,"]), max_size=6))
def test_one_valid_v1_among_others_is_enough(client: FlaskClient, junk: list[str]) -> None:
    body = _event_body()
    valid = sign(body)
    timestamp, signature = valid.split(",")
    header = ",".join([timestamp, *[part for part in junk if not part.startswith("t=")], signature])

    assert _post(client, body, header).status_code == 200


def test_v0_only_or_other_schemes_are_refused(client: FlaskClient, engine: Engine) -> None:
    body = _event_body()
    timestamp, signature = sign(body).split(",")
    for header in (f"{timestamp},v0={signature[3:]}", f"{timestamp},v2={signature[3:]}", signature, timestamp):
        assert _post(client, body, header).status_code == 400, header
    old_valid = sign(body, timestamp=now() - 3600)  # a captured delivery, replayed an hour later
    assert _post(client, body, old_valid).status_code == 400
    assert count(engine, WRITTEN) == 0


def test_either_configured_secret_is_accepted(client: FlaskClient, engine: Engine) -> None:
    first = samples.event("customer.created", samples.customer())
    second = samples.event("customer.created", samples.customer())

    assert deliver(client, first, secret=SECRET).get_json()["status"] == "processed"
    assert deliver(client, second, secret=SECOND_SECRET).get_json()["status"] == "processed"


def test_bad_deliveries_get_400_and_write_nothing(client: FlaskClient, engine: Engine) -> None:
    event = samples.event("customer.created", samples.customer(email="secret.person@example.com"))
    body = json.dumps(event)
    cases = {
        "no header": {},
        "wrong secret": {"Stripe-Signature": sign(body, secret="whsec_not_configured")},
        "other body": {"Stripe-Signature": sign(body.replace("secret.person", "someone.else"))},
        "too old": {"Stripe-Signature": sign(body, timestamp=now() - 301)},
        "too new": {"Stripe-Signature": sign(body, timestamp=now() + 301)},
        "garbage header": {"Stripe-Signature": "not a signature"},
    }
    for name, headers in cases.items():
        status, answer = _post_headers(client, body, headers)
        assert status == 400, name
        assert set(answer) == {"error"}, name
        rendered = json.dumps(answer)
        assert "secret.person" not in rendered and "whsec_" not in rendered and "v1=" not in rendered, name
    assert "tolerance" in _post_headers(client, body, cases["too old"])[1]["error"]  # type: ignore[operator]
    assert count(engine, WRITTEN) == 0
