"""Applying and undoing db/*.sql, with an optional schema backup first."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from sqlalchemy import Engine

from webhook.embedded import pg_bin
from webhook.store import DB_DIR, run_sql_file

SHIM = DB_DIR / "supabase_shim.sql"
SCHEMA = DB_DIR / "schema.sql"
FUNCTIONS = DB_DIR / "functions.sql"
ROLLBACK = DB_DIR / "rollback.sql"


def backup_schema(database_url: str, backup_dir: Path) -> Path:
    """pg_dump --schema-only into backup_dir, before a migration touches anything."""
    backup_dir.mkdir(parents=True, exist_ok=True)
    target = backup_dir / time.strftime("schema-%Y%m%dT%H%M%SZ.sql", time.gmtime())
    libpq_url = database_url.replace("postgresql+psycopg2://", "postgresql://", 1)
    subprocess.run(
        [pg_bin("pg_dump"), "--schema-only", "--no-owner", f"--file={target}", f"--dbname={libpq_url}"],
        check=True,
        capture_output=True,
    )
    return target


def migrate(engine: Engine, shim: bool) -> list[Path]:
    applied = [SHIM, SCHEMA, FUNCTIONS] if shim else [SCHEMA, FUNCTIONS]
    with engine.connect() as connection:
        for path in applied:
            run_sql_file(connection, path)
    return applied


def rollback(engine: Engine) -> None:
    with engine.connect() as connection:
        run_sql_file(connection, ROLLBACK)
