"""Structured JSON log lines. Callers pass ids, types and outcomes only: never emails, names,
secrets, signatures or payloads."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER = logging.getLogger("webhook")


class JsonFormatter(logging.Formatter):
    # One line per event is written at thousands a second: the second's text is made once.
    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        line: dict[str, Any] = {
            "ts": f"{self._second[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        return json.dumps(line, separators=(",", ":"))


class _StandardError(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is written, not to what it was when logging was
    configured: a redirected stream (a test's capture, a supervisor's) sees every line."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    if any(isinstance(handler.formatter, JsonFormatter) for handler in LOGGER.handlers):
        return
    handler = _StandardError()
    handler.setFormatter(JsonFormatter())
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False  # one line per event, whatever the host (gunicorn, tests) did to the root logger


def log(level: int, message: str, **fields: Any) -> None:
    # Logger.log would look up the caller's file and line by walking the stack (a costly part of a
    # log line, and the format never shows them): the record is made and handed over directly.
    if LOGGER.isEnabledFor(level):
        LOGGER.handle(LOGGER.makeRecord(LOGGER.name, level, "", 0, message, (), None, extra={"fields": fields}))
