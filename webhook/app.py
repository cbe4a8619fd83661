"""HTTP in: verify, record, hand off. Nothing else happens in the web layer."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from typing import Any

from flask import Flask, Response, jsonify, request
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from webhook import console, metrics, objects_store, thin_queue
from webhook.config import Settings, load_settings
from webhook.database import make_engine, schema_ready, side_engine
from webhook.logs import configure_logging, log
from webhook.process import DatabaseUnavailable, ProcessingFailed, process_delivery, process_event, unavailable
from webhook.readiness import Readiness
from webhook.signature import Event, RejectedDelivery, parse_event, verify_signature

WEBHOOK_PATH = "/webhooks/stripe"


def answer_delivery(
    body: bytes, signature: str | None, engine: Engine, settings: Settings
) -> tuple[int, dict[str, Any]]:
    """Every webhook delivery's answer (docs/reference.md, "Answers"), whichever way it came in."""
    started = time.perf_counter()
    try:
        event = _verified(body, signature, settings)
        return 200, {"event_id": event.id, "status": process_event(engine, event, settings).value}
    except Exception as error:
        return _refusal(error)
    finally:
        metrics.LATENCY.observe(time.perf_counter() - started)


async def answer_delivery_from_loop(
    body: bytes, signature: str | None, engine: Engine, settings: Settings, threads: Executor
) -> tuple[int, dict[str, Any]]:
    """The same answer, from the server's event loop (process.process_delivery)."""
    started = time.perf_counter()
    try:
        event = _verified(body, signature, settings)
        return 200, {"event_id": event.id, "status": (await process_delivery(engine, event, settings, threads)).value}
    except Exception as error:
        return _refusal(error)
    finally:
        metrics.LATENCY.observe(time.perf_counter() - started)


def _verified(body: bytes, signature: str | None, settings: Settings) -> Event:
    # Verify the exact bytes Stripe signed, before anything trusts them.
    verify_signature(body, signature, settings.webhook_secrets, settings.tolerance)
    return parse_event(body)


def _refusal(error: Exception) -> tuple[int, dict[str, Any]]:
    """The answer for a delivery that was not handled; an error not listed here is raised again."""
    if isinstance(error, RejectedDelivery):
        metrics.REJECTED.labels(status="400").inc()
        return 400, {"error": str(error)}
    if isinstance(error, DatabaseUnavailable):
        return 503, {"error": "database unavailable; retry later"}
    if isinstance(error, ProcessingFailed):
        reason = error.shown or "processing failed; the event is kept for replay"
        return 500, {"error": reason, "event_id": error.event_id}
    raise error


def _answer(code: int, /, **body: Any) -> tuple[Response, int]:
    return jsonify(body), code


def _check_database(engine: Engine, settings: Settings) -> None:
    """Say at start when the database cannot be reached (the server still starts and answers 503
    until it can: Stripe retries); when it can, write the settings SQL reads (STRIPE_PAST_DUE_GRACE)."""
    try:
        with engine.connect() as connection:
            if not schema_ready(connection):
                log(logging.ERROR, "schema not applied: run `python -m webhook db migrate`")
            else:
                objects_store.write_settings(connection, settings.past_due_grace)
    except SQLAlchemyError as error:
        unavailable(engine, error, "connect")


def create_app(
    settings: Settings | None = None, engine: Engine | None = None, *, read_thin: bool | None = None
) -> Flask:
    """The Flask app: every endpoint, for the test client and any WSGI server (the server runs
    webhook/asgi.py around it). With no arguments it reads the environment; in embedded mode it
    starts (or joins) the embedded Postgres. Deliveries use `engine` (DB_POOL_SIZE connections);
    the console and /metrics a small pool of their own, and the thin notifications' readers
    another (webhook/thin_queue.py), started when the app is the server's own (read_thin unset and
    no settings given) or when read_thin says so."""
    read_thin = settings is None if read_thin is None else read_thin
    settings = settings or load_settings()
    if engine is None:
        from webhook.embedded import database_url

        engine = make_engine(database_url(settings), settings.db_pool_size, free_tier=settings.free_tier)
    url = engine.url.render_as_string(hide_password=False)
    side = side_engine(url, settings.free_tier)
    configure_logging()
    _check_database(engine, settings)
    if read_thin and settings.stripe_api_key is not None:
        thin_queue.start(make_engine(url, thin_queue.POOL_SIZE, free_tier=settings.free_tier), settings)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_webhook_bytes

    @app.post(WEBHOOK_PATH)
    def stripe_webhook() -> tuple[Response, int]:
        status, answer = answer_delivery(
            request.get_data(cache=False), request.headers.get("Stripe-Signature"), engine, settings
        )
        return jsonify(answer), status

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return _answer(200, status="ok")

    readiness = Readiness(engine)

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        problem = readiness.problem()
        if problem:
            return _answer(503, status="unavailable", error=problem)
        return _answer(200, status="ready")

    @app.get("/metrics")
    def prometheus() -> Response:
        payload, content_type = metrics.render(side)
        return Response(payload, content_type=content_type)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        status = error.code or 500
        if status == 413:
            metrics.REJECTED.labels(status="413").inc()
        return _answer(status, error=error.name.lower())

    console.install(app, side, settings)
    app.extensions["webhook"] = (engine, settings)  # for webhook/asgi.py, which serves deliveries itself
    return app
