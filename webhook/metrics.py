"""Prometheus metrics. Under gunicorn (PROMETHEUS_MULTIPROC_DIR set) every worker writes its own
files and /metrics adds them up, so the figures cover all workers, not the one that answered."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

EVENTS = Counter("stripe_webhook_events_total", "Verified Stripe events by type and outcome", ["type", "outcome"])
REJECTED = Counter("stripe_webhook_rejected_total", "Deliveries answered 4xx, by status", ["status"])
DB_ERRORS = Counter("stripe_webhook_db_errors_total", "Database errors while handling events", ["kind"])
TIES = Counter(
    "stripe_webhook_ties_total",
    "Same-second events of one customer, by the rule that ordered them (type, previous_attributes, stripe, unsettled)",
    ["settled_by"],
)
LATENCY = Histogram(
    "stripe_webhook_request_seconds",
    "Time to answer a webhook delivery",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
LAST_PROCESSED = Gauge(
    "stripe_webhook_last_processed_event_created_seconds",
    "Stripe created time of the newest event applied (age = time() - this)",
    multiprocess_mode="max",
)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
