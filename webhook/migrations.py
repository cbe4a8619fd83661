"""Applying and undoing db/*.sql, with an optional schema backup first."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from webhook.embedded import pg_bin
from webhook.store import DB_DIR, describe_target, run_sql_file

SHIM = DB_DIR / "supabase_shim.sql"
SCHEMA = DB_DIR / "schema.sql"
FUNCTIONS = DB_DIR / "functions.sql"
ROLLBACK = DB_DIR / "rollback.sql"


PG_DUMP_SECONDS = 120


class BackupFailed(Exception):
    """pg_dump failed or timed out; the message says why and where, never the password."""


def backup_schema(database_url: str, backup_dir: Path) -> Path:
    """pg_dump --schema-only into backup_dir, before a migration touches anything. The password
    travels in the environment, not on the command line, where a failure's message would show it."""
    backup_dir.mkdir(parents=True, exist_ok=True)
    target = backup_dir / time.strftime("schema-%Y%m%dT%H%M%SZ.sql", time.gmtime())
    url = make_url(database_url)
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10", "PGPASSWORD": url.password or ""}
    libpq_url = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    where = describe_target(database_url)
    try:
        subprocess.run(
            [pg_bin("pg_dump"), "--schema-only", "--no-owner", f"--file={target}", f"--dbname={libpq_url}"],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            timeout=PG_DUMP_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise BackupFailed(f"pg_dump ({where}) did not finish in {PG_DUMP_SECONDS} s") from None
    except subprocess.CalledProcessError as failure:
        reason = (failure.stderr or "").strip().splitlines()
        raise BackupFailed(f"pg_dump ({where}) failed: {reason[-1] if reason else failure.returncode}") from None
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
