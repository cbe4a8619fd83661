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
# Threaded workers keep connections alive: Stripe and load balancers reuse them, and a sync
# worker's Connection: close costs a TCP handshake per event. Buffered: a thread only ever sees a
# whole request, so stalled clients cannot hold the threads (webhook/worker.py).
worker_class = "webhook.worker.BufferedThreadWorker"
# 8: the deliveries a worker holds at once share one statement (webhook/batch.py), and with 8 the
# statements carry more of them than with 4, for less CPU an event on both sides; 12 and 16 did no
# better (docs/performance.md).
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
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
