"""HTTP in: verify, record, hand off. Nothing else happens in the web layer."""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, Response, jsonify, request
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from webhook import metrics
from webhook.config import Settings, load_settings
from webhook.logs import configure_logging
from webhook.process import DatabaseUnavailable, ProcessingFailed, process_event
from webhook.store import make_engine, schema_ready
from webhook.verify import RejectedDelivery, parse_event, verify_signature


def _answer(code: int, /, **body: Any) -> tuple[Response, int]:
    return jsonify(body), code


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> Flask:
    """The WSGI app. With no arguments (gunicorn's `webhook.app:create_app()`) it reads the
    environment; in embedded mode it starts (or joins) the embedded Postgres."""
    settings = settings or load_settings()
    if engine is None:
        from webhook.embedded import database_url

        engine = make_engine(database_url(settings), settings.db_pool_size)
    configure_logging()

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_webhook_bytes

    @app.post("/webhooks/stripe")
    def stripe_webhook() -> tuple[Response, int]:
        started = time.perf_counter()
        try:
            # Verify the exact bytes Stripe signed, before anything trusts them.
            body = request.get_data(cache=False)
            verify_signature(
                body, request.headers.get("Stripe-Signature"), settings.webhook_secrets, settings.tolerance
            )
            event = parse_event(body)
            outcome = process_event(engine, event, settings)
            return _answer(200, event_id=event.id, status=outcome.value)
        except RejectedDelivery as rejection:
            metrics.REJECTED.labels(status="400").inc()
            return _answer(400, error=str(rejection))
        except DatabaseUnavailable:
            return _answer(503, error="database unavailable; retry later")
        except ProcessingFailed as failure:
            return _answer(500, error="processing failed; the event is kept for replay", event_id=failure.event_id)
        finally:
            metrics.LATENCY.observe(time.perf_counter() - started)

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return _answer(200, status="ok")

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        try:
            with engine.connect() as connection:
                ready = schema_ready(connection)
        except SQLAlchemyError:
            return _answer(503, status="unavailable", error="database unreachable")
        if not ready:
            return _answer(503, status="unavailable", error="schema not applied")
        return _answer(200, status="ready")

    @app.get("/metrics")
    def prometheus() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, content_type=content_type)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        status = error.code or 500
        if status == 413:
            metrics.REJECTED.labels(status="413").inc()
        return _answer(status, error=error.name.lower())

    return app
