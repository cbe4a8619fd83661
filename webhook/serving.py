"""How the consumer is served: gunicorn with this project's settings (webhook/gunicorn_conf.py),
as `serve`, the tests and the benchmark all start it."""

from __future__ import annotations

import sys


def gunicorn_command(bind: str, *options: str, app: str = "webhook.asgi:create_app()") -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", "python:webhook.gunicorn_conf", "--bind", bind, *options, app]
