"""/readyz's database check, bounded: a load balancer or Kubernetes probe must get an answer within
READY_SECONDS even when the database never answers (the connect timeout is 5 s and a busy pool
waits up to 10 s), and many probes at once must not pile up connections or threads."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from webhook.database import schema_ready

READY_SECONDS = 2.0


class Readiness:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readyz")
        self._lock = threading.Lock()
        self._running: Future[str | None] | None = None

    def _check(self) -> str | None:
        try:
            with self._engine.connect() as connection:
                return None if schema_ready(connection) else "schema not applied"
        except SQLAlchemyError:
            return "database unreachable"

    def problem(self) -> str | None:
        """None when ready, else what is wrong; probes arriving during a check share it."""
        with self._lock:
            if self._running is None or self._running.done():
                self._running = self._checks.submit(self._check)
            running = self._running
        try:
            return running.result(timeout=READY_SECONDS)
        except FutureTimeout:
            return f"database did not answer within {READY_SECONDS:.0f} s"
