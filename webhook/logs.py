"""Structured JSON log lines. Callers pass ids, types and outcomes only: never emails, names,
secrets, signatures or payloads."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

LOGGER = logging.getLogger("webhook")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        return json.dumps(line, separators=(",", ":"))


def configure_logging(level: int = logging.INFO) -> None:
    if any(isinstance(handler.formatter, JsonFormatter) for handler in LOGGER.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False  # one line per event, whatever the host (gunicorn, tests) did to the root logger


def log(level: int, message: str, **fields: Any) -> None:
    LOGGER.log(level, message, extra={"fields": fields})
