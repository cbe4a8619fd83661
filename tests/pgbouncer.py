"""PgBouncer in transaction mode in front of a test's Postgres: what Supabase's pooler (port 6543)
does to the consumer's connections: any statement of a session may go to another server backend."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from tests.server import free_port

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@contextmanager
def pgbouncer(database_url: str) -> Iterator[str]:
    """A URL through a fresh PgBouncer (pool_mode = transaction) to the database at database_url."""
    if not os.path.exists(PGBOUNCER):
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)")
    url = make_url(database_url)
    host = url.host or url.query.get("host")
    # PgBouncer will not run as root; it runs as the owner of the embedded server's socket.
    user = pwd.getpwuid(os.stat(host).st_uid).pw_name if host and host.startswith("/") else "postgres"
    work = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    os.chmod(work, 0o777)
    port = free_port()
    (work / "users.txt").write_text(f'"{url.username}" ""\n')
    (work / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={host} port={url.port or 5432} user={url.username}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {work}/users.txt
pool_mode = transaction
max_client_conn = 500
default_pool_size = 20
server_login_retry = 1
ignore_startup_parameters = extra_float_digits,options
logfile = {work}/pgbouncer.log
pidfile = {work}/pgbouncer.pid
"""
    )
    process = subprocess.Popen([PGBOUNCER, "-q", "-u", user, str(work / "pgbouncer.ini")])
    through = f"postgresql://{url.username}@127.0.0.1:{port}/{url.database}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg2.connect(through, connect_timeout=2).close()
                break
            except psycopg2.OperationalError:
                assert time.monotonic() < deadline, (work / "pgbouncer.log").read_text()[-2000:]
                time.sleep(0.1)
        yield through
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
