"""gunicorn settings for `serve` and the Procfile (`gunicorn -c python:webhook.gunicorn_conf`)."""

import gc
import os
import tempfile

# Workers write their metrics to files that /metrics adds up; it must be set before any worker
# imports prometheus_client.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="stripe-webhook-metrics-"))

from prometheus_client import multiprocess  # noqa: E402

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# An event loop reads the requests (uvicorn's, guarded: webhook/worker.py); the app hands whole
# deliveries to its DELIVERY_THREADS threads (webhook/asgi.py). Connections are kept alive: Stripe
# and load balancers reuse them.
worker_class = "webhook.worker.Worker"
# gunicorn's control socket (~/.gunicorn/gunicorn.ctl, one path for every instance) is unused
# here, and two consumers on one machine would fight over it.
control_socket_disable = True
keepalive = 30
timeout = 30
graceful_timeout = 20


def child_exit(server: object, worker: object) -> None:
    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined,no-untyped-call]


def post_worker_init(worker: object) -> None:
    # What the worker loaded (Flask, SQLAlchemy, stripe, the app) lives as long as it does: frozen,
    # the collector stops re-scanning it on every full collection, which it otherwise does under load.
    gc.freeze()
