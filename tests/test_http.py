"""Every answer of POST /webhooks/stripe (docs/reference.md), from the real Flask app, with real
signatures on a real Postgres."""

from __future__ import annotations

import io
import json

from flask.testing import FlaskClient
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from tests.support import (
    count,
    customer_row,
    deliver,
    event_row,
    failing_writes,
    settings_for,
    sign,
)
from webhook import samples
from webhook.app import create_app
from webhook.database import make_engine

NOTHING_WRITTEN = "SELECT (SELECT count(*) FROM stripe_webhook_events) + (SELECT count(*) FROM stripe_customers)"


def test_customer_created_is_processed_and_logged(client: FlaskClient, engine: Engine) -> None:
    customer = samples.customer(email="ada@example.com", name="Ada Lovelace")
    event = samples.event("customer.created", customer)

    answer = deliver(client, event)

    assert answer.status_code == 200
    assert answer.get_json() == {"event_id": event["id"], "status": "processed"}
    row = customer_row(engine, customer["id"])
    assert row is not None and row["customer_email"] == "ada@example.com" and row["customer_name"] == "Ada Lovelace"
    logged = event_row(engine, event["id"])
    assert logged is not None
    assert (logged["status"], logged["type"], logged["attempts"]) == ("processed", "customer.created", 1)
    assert logged["payload"] == event and logged["processed_at"] is not None
    assert logged["api_version"] == samples.API_VERSION and logged["livemode"] is False


def test_second_delivery_of_an_event_is_a_duplicate(client: FlaskClient, engine: Engine) -> None:
    event = samples.event("customer.created", samples.customer())
    assert deliver(client, event).get_json()["status"] == "processed"

    answer = deliver(client, event)

    assert answer.status_code == 200 and answer.get_json() == {"event_id": event["id"], "status": "duplicate"}
    assert event_row(engine, event["id"])["attempts"] == 1  # type: ignore[index]
    assert count(engine, "SELECT count(*) FROM stripe_customers_audit") == 1


def test_unhandled_type_is_logged_as_ignored(client: FlaskClient, engine: Engine) -> None:
    event = samples.event_of_type("charge.succeeded")

    answer = deliver(client, event)

    assert answer.get_json() == {"event_id": event["id"], "status": "ignored"}
    assert event_row(engine, event["id"])["status"] == "ignored"  # type: ignore[index]
    assert count(engine, "SELECT count(*) FROM stripe_customers") == 0
    assert deliver(client, event).get_json()["status"] == "duplicate"


def test_event_of_the_other_livemode_is_ignored(database_url: str, engine: Engine) -> None:
    client = create_app(settings_for(database_url, STRIPE_EXPECT_LIVEMODE="true"), engine).test_client()
    customer = samples.customer()
    event = samples.event("customer.created", customer, livemode=False)

    assert deliver(client, event).get_json()["status"] == "ignored"
    assert customer_row(engine, customer["id"]) is None
    assert event_row(engine, event["id"])["status"] == "ignored"  # type: ignore[index]


def _post(client: FlaskClient, body: bytes | str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    answer = client.post("/webhooks/stripe", data=body, headers=headers)
    return answer.status_code, answer.get_json()


def test_signed_bodies_that_are_not_events_get_400(client: FlaskClient, engine: Engine) -> None:
    good = samples.event("customer.created", samples.customer())
    not_events = [
        "this is not json",
        "[1, 2, 3]",
        json.dumps({**good, "id": "ch_123"}),
        json.dumps({key: value for key, value in good.items() if key != "type"}),
        json.dumps({**good, "created": "yesterday"}),
        json.dumps({**good, "data": {"previous_attributes": {}}}),
        '{"id": "evt_1", "type": "customer.created", "created": NaN, "data": {"object": {}}}',
    ]
    for body in not_events:
        status, answer = _post(client, body, {"Stripe-Signature": sign(body)})
        assert status == 400, body
        assert "error" in answer
    assert count(engine, NOTHING_WRITTEN) == 0


def test_other_methods_get_405(client: FlaskClient) -> None:
    for method in ("get", "put", "delete", "patch"):
        assert getattr(client, method)("/webhooks/stripe").status_code == 405


def test_body_over_the_limit_gets_413(database_url: str, engine: Engine) -> None:
    client = create_app(settings_for(database_url, MAX_WEBHOOK_BYTES="2048"), engine).test_client()
    customer = samples.customer(metadata={"padding": "x" * 4096})
    event = samples.event("customer.created", customer)

    assert deliver(client, event).status_code == 413
    assert count(engine, NOTHING_WRITTEN) == 0


def test_unreachable_database_gets_503(database_url: str) -> None:
    dead = make_engine("postgresql://postgres@127.0.0.1:1/postgres", pool_size=1)
    client = create_app(settings_for(database_url), dead).test_client()
    event = samples.event("customer.created", samples.customer())

    answer = deliver(client, event)

    assert answer.status_code == 503 and set(answer.get_json()) == {"error"}
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_dropped_pool_connections_are_replaced_without_a_503(database_url: str, engine: Engine) -> None:
    own = make_engine(database_url, pool_size=3)
    client = create_app(settings_for(database_url), own).test_client()
    pooled = [own.raw_connection() for _ in range(3)]  # fill the pool
    pids = [connection.dbapi_connection.get_backend_pid() for connection in pooled]  # type: ignore[union-attr]
    for connection in pooled:
        connection.close()
    with engine.connect() as admin:  # the server drops every pooled connection (a restart, a failover)
        admin.execute(text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:pids AS int[])) AS pid"), {"pids": pids})

    events = [samples.event("customer.created", samples.customer()) for _ in range(5)]
    answers = [deliver(client, event) for event in events]

    assert [answer.get_json()["status"] for answer in answers] == ["processed"] * 5
    assert all(event_row(engine, event["id"]) is not None for event in events)
    own.dispose()


def test_unexpected_failure_gets_500_and_a_failed_log_row(client: FlaskClient, engine: Engine) -> None:
    # A verified event the database refuses to apply (a trigger stands in for any fault).
    customer = samples.customer(email="who@example.com")
    event = samples.event("customer.created", customer)

    with failing_writes(engine, "public.stripe_customers", "BEFORE"):
        answer = deliver(client, event)

    assert answer.status_code == 500
    body = answer.get_json()
    assert body["event_id"] == event["id"] and "error" in body and "who@example.com" not in json.dumps(body)
    logged = event_row(engine, event["id"])
    assert logged is not None and logged["status"] == "failed" and "injected failure" in logged["last_error"]
    assert "who@example.com" not in logged["last_error"]
    assert customer_row(engine, customer["id"]) is None
    # Stripe's retry runs it again and fails again: counted, still replayable.
    with failing_writes(engine, "public.stripe_customers", "BEFORE"):
        assert deliver(client, event).status_code == 500
    assert event_row(engine, event["id"])["attempts"] == 2  # type: ignore[index]


def test_health_readiness_and_metrics(client: FlaskClient, engine: Engine, database_url: str) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready"}
    counter = 'stripe_webhook_events_total{outcome="processed",type="customer.created"} '

    def processed() -> float:
        metrics = client.get("/metrics").get_data(as_text=True)
        assert "stripe_webhook_request_seconds_bucket" in metrics
        line = next((line for line in metrics.splitlines() if line.startswith(counter)), counter + "0")
        return float(line.removeprefix(counter))

    before = processed()  # what earlier tests in this process counted
    assert deliver(client, samples.event("customer.created", samples.customer())).get_json()["status"] == "processed"
    assert processed() == before + 1
    with engine.connect() as connection:
        connection.execute(text("DROP DATABASE IF EXISTS no_schema"))
        connection.execute(text("CREATE DATABASE no_schema"))
    bare_url = make_url(database_url).set(database="no_schema")
    bare = create_app(settings_for(database_url), make_engine(bare_url.render_as_string(False), 1)).test_client()
    answer = bare.get("/readyz")
    assert answer.status_code == 503 and "schema" in answer.get_json()["error"]


def test_a_chunked_delivery_is_answered_by_the_flask_route_the_same_way(client: FlaskClient, engine: Engine) -> None:
    # No Content-Length (chunked transfer): the WSGI fast lane leaves it to the Flask route.
    event = samples.event("customer.created", samples.customer())
    body = json.dumps(event).encode()
    answer = client.post(
        "/webhooks/stripe",
        input_stream=io.BytesIO(body),
        headers={"Stripe-Signature": sign(body.decode()), "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""},
    )
    assert answer.status_code == 200 and answer.get_json() == {"event_id": event["id"], "status": "processed"}
    assert answer.headers["Content-Type"] == "application/json"
    assert customer_row(engine, event["data"]["object"]["id"]) is not None
