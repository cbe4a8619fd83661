"""Prometheus metrics. Under gunicorn (PROMETHEUS_MULTIPROC_DIR set) every worker writes its own
files and /metrics adds them up, so the figures cover all workers, not the one that answered."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from webhook import jobs_store

EVENTS = Counter("stripe_webhook_events_total", "Verified Stripe events by type and outcome", ["type", "outcome"])
REJECTED = Counter("stripe_webhook_rejected_total", "Deliveries answered 4xx, by status", ["status"])
DB_ERRORS = Counter("stripe_webhook_db_errors_total", "Database errors while handling events", ["kind"])
TIES = Counter(
    "stripe_webhook_ties_total",
    "Same-second events of one customer, by the rule that ordered them (type, previous_attributes, stripe, unsettled)",
    ["settled_by"],
)
STRIPE_READS = Counter("stripe_api_reads_total", "Requests made to the Stripe API within the shared read budget")
STRIPE_RATE_LIMITED = Counter("stripe_api_rate_limited_total", "Stripe API answers 429 (rate limited)")
THIN_COALESCED = Counter(
    "stripe_thin_reads_coalesced_total", "Thin notifications settled by a read made for another one of the same object"
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


class LogHealth:
    """Read at each scrape from the database, whichever process wrote it: the failed events waiting,
    how long since an event was processed, and what heal's last round did."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            health = jobs_store.log_health(self.engine)
            heal = jobs_store.saved_json(self.engine, jobs_store.Cursor.HEAL_STATE)
        except SQLAlchemyError:
            return  # the database is down: /readyz and the 503s say so
        now = time.time()
        yield _gauge(
            "stripe_thin_waiting",
            "Thin notifications waiting for their read from Stripe",
            health["thin_waiting"] or 0.0,
        )
        yield _gauge(
            "stripe_thin_oldest_waiting_age_seconds",
            "Age of the oldest thin notification waiting for its read (0 when none)",
            0.0 if health["thin_first"] is None else max(0.0, now - health["thin_first"]),
        )
        oldest, last = health["oldest_failed"], health["last_processed"]
        yield _gauge(
            "stripe_webhook_failed_events", "Events stored as failed, waiting for a replay", health["failed"] or 0.0
        )
        yield _gauge(
            "stripe_webhook_oldest_failed_event_age_seconds",
            "Age of the oldest failed event (0 when none)",
            0.0 if oldest is None else now - oldest,
        )
        if last is not None:
            yield _gauge(
                "stripe_webhook_seconds_since_last_processed_event",
                "Seconds since an event was last processed",
                now - last,
            )
        round_ = heal.get("round") or {}
        for name, help_text, value in (
            ("stripe_heal_last_success_timestamp_seconds", "When heal last finished a round", heal.get("last_success")),
            ("stripe_heal_last_round_timestamp_seconds", "When heal's last round started", heal.get("last_round")),
            ("stripe_heal_last_round_failed", "1 when heal's last round failed", int(bool(round_.get("error")))),
            (
                "stripe_heal_last_round_recovered_events",
                "Missed events heal's last round processed",
                round_.get("recovered"),
            ),
            (
                "stripe_heal_drift_found",
                "Rows that differed from Stripe at the last reconciliation",
                heal.get("drift_found"),
            ),
            ("stripe_heal_drift_fixed", "Of those, rows the last reconciliation fixed", heal.get("drift_fixed")),
        ):
            if value is not None and heal:
                yield _gauge(name, help_text, float(value))


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def render(engine: Engine | None = None) -> tuple[bytes, str]:
    from_database = CollectorRegistry()
    if engine is not None:
        from_database.register(LogHealth(engine))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry) + generate_latest(from_database), CONTENT_TYPE_LATEST
    return generate_latest() + generate_latest(from_database), CONTENT_TYPE_LATEST
