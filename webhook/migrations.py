"""Applying and undoing db/*.sql, with an optional schema backup first."""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
import time
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import psycopg2
from psycopg2 import errorcodes
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from webhook.database import DB_DIR, describe_target, index_valid, run_sql
from webhook.embedded import pg_bin

log = logging.getLogger(__name__)

SHIM = DB_DIR / "supabase_shim.sql"
SHAPE = DB_DIR / "shape.sql"
SCHEMA = DB_DIR / "schema.sql"
FUNCTIONS = DB_DIR / "functions.sql"
BILLING = DB_DIR / "billing.sql"
ORGANIZATIONS = DB_DIR / "organizations.sql"
ONE_SHAPE = DB_DIR / "one_shape.sql"
CONSOLE = DB_DIR / "console.sql"
QUEUE = DB_DIR / "queue.sql"
ACCESS = DB_DIR / "access.sql"
ROLLBACK = DB_DIR / "rollback.sql"
ONE_SHAPE_UNDO = DB_DIR / "one_shape_undo.sql"
# What `db migrate` applies, in this order (the shim first, with --shim).
APPLIED = (SHAPE, SCHEMA, FUNCTIONS, BILLING, ORGANIZATIONS, ONE_SHAPE, CONSOLE, QUEUE, ACCESS)


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


class MigrationFailed(Exception):
    """A step failed for another reason than a lock it could not get, or never got its lock."""


@dataclass(frozen=True)
class Step:
    file: str
    title: str
    sql: str
    repeat: bool  # run again while it changes rows: a fill in batches

    @property
    def index(self) -> str | None:
        found = _CREATE_CONCURRENTLY.search(self.sql)
        return found.group(1) if found else None


_STEP = re.compile(r"^-- step( \(repeat\))?:(.*)$", re.MULTILINE)
_CREATE_CONCURRENTLY = re.compile(r"CREATE (?:UNIQUE )?INDEX CONCURRENTLY IF NOT EXISTS (\w+)")
# Each step waits at most this long for a lock, so the deliveries queued behind it wait no longer;
# a step that could not get its lock is retried, up to LOCK_ATTEMPTS times over about a minute.
LOCK_TIMEOUT = "1s"
LOCK_ATTEMPTS = 20
LOCK_FAILURES = {errorcodes.LOCK_NOT_AVAILABLE, errorcodes.DEADLOCK_DETECTED}


def steps(path: Traversable) -> list[Step]:
    """The file's `-- step:` parts in order; a file without markers is one step."""
    text = path.read_text()
    marks = list(_STEP.finditer(text))
    if not marks:
        return [Step(path.name, path.name, text, False)]
    found, title = [], path.name
    starts = [0] + [mark.start() for mark in marks[1:]]  # the header comment goes with the first
    for mark, start, end in zip(marks, starts, starts[1:] + [len(text)], strict=True):
        title = mark.group(2).strip() or title
        found.append(Step(path.name, title, text[start:end], bool(mark.group(1))))
    return found


def _run(connection: Connection, step: Step) -> None:
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            valid = index_valid(connection, step.index) if step.index else None
            if valid:
                return  # built: CREATE INDEX CONCURRENTLY would still lock the table, briefly
            if valid is False:
                # A build interrupted earlier (a lock timeout, say) leaves an invalid index behind.
                run_sql(connection, f"DROP INDEX CONCURRENTLY IF EXISTS public.{step.index}", LOCK_TIMEOUT)
            while run_sql(connection, step.sql, LOCK_TIMEOUT) > 0 and step.repeat:
                pass
            return
        except (DBAPIError, psycopg2.Error) as failure:
            error = getattr(failure, "orig", failure)  # run_sql works on the driver's cursor
            if getattr(error, "pgcode", None) not in LOCK_FAILURES or attempt == LOCK_ATTEMPTS:
                reason = str(error).strip().splitlines()[0]
                raise MigrationFailed(f"{step.file}, step '{step.title}': {reason}") from None
            log.warning("%s, step '%s' waited for a lock (attempt %d); retrying", step.file, step.title, attempt)
            time.sleep(min(0.2 * 2**attempt, 5) * random.uniform(0.5, 1))


def migrate(engine: Engine, shim: bool) -> list[Traversable]:
    """Each step of each file in its own short transaction (db/schema.sql says why). A failed step
    leaves the ones before it applied; every step is idempotent, so running migrate again finishes."""
    applied = [SHIM, *APPLIED] if shim else list(APPLIED)
    with engine.connect() as connection:
        for path in applied:
            for step in steps(path):
                _run(connection, step)
    return applied


_CONCURRENTLY = re.compile(r"\b(CREATE (?:UNIQUE )?INDEX|DROP INDEX) CONCURRENTLY(?= IF)")


def as_one_migration(shim: bool) -> str:
    """What `db migrate` applies, as one SQL file for a team's own migrations (`db sql`): the same
    statements in the same order, idempotent, with the indexes built plainly, since a migration tool
    runs a file in one transaction and CONCURRENTLY cannot run in one."""
    header = (
        "-- The Stripe webhook consumer's schema, as `python -m webhook db migrate"
        + (" --shim" if shim else "")
        + "` applies it (printed by `db sql`).\n"
        "-- Idempotent: safe to apply again, and `db migrate` afterwards finds it in shape. Indexes are built\n"
        "-- without CONCURRENTLY so the file runs in one transaction; on tables that already hold many rows,\n"
        "-- `db migrate` builds them without blocking writes instead.\n"
    )
    parts = []
    for path in [SHIM, *APPLIED] if shim else APPLIED:
        parts.append(f"\n-- ==== db/{path.name} ====\n" + _CONCURRENTLY.sub(r"\1", path.read_text()))
    return header + "".join(parts)


def rollback(engine: Engine) -> None:
    with engine.connect() as connection:
        run_sql(connection, ROLLBACK.read_text())


def to_previous_release(engine: Engine) -> None:
    """db/one_shape_undo.sql, step by step: the shapes the release before 2026-12-07 reads."""
    with engine.connect() as connection:
        for step in steps(ONE_SHAPE_UNDO):
            _run(connection, step)
