"""Installed as a package (a wheel, as `pip install .` or a Docker image does), outside the
checkout, the consumer starts: its SQL ships inside the package."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv holding the project's wheel; its dependencies are read from this environment's
    site-packages (a path entry, so the checkout's editable install is not seen there)."""
    where = tmp_path_factory.mktemp("installed")
    # Built from a copy: setuptools leaves a build/ folder in the tree it builds.
    source = where / "source"
    shutil.copytree(
        ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(".venv", ".git", ".data", "build", "*.egg-info")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(where),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = where.glob("*.whl")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    yield python


def _run(python: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "PYTHONPATH")}
    return subprocess.run(
        [python, "-m", "webhook", *args],
        cwd=cwd,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_installed_package_is_the_wheel_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    found = subprocess.run(
        [installed, "-c", "import webhook; print(webhook.__file__)"], cwd=tmp_path, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr
    assert not found.stdout.startswith(str(ROOT)), found.stdout


def test_db_migrate_from_another_folder(installed: Path, tmp_path: Path, database_url: str) -> None:
    migrated = _run(
        installed, tmp_path, "db", "migrate", "--shim", DATABASE_URL=database_url, STRIPE_WEBHOOK_SECRET="whsec_x"
    )
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith(
        "applied supabase_shim.sql, shape.sql, schema.sql, functions.sql, billing.sql, organizations.sql, "
        "one_shape.sql, console.sql, queue.sql, access.sql"
    )


def test_serve_and_send_from_another_folder(installed: Path, tmp_path: Path) -> None:
    port = str(free_port())
    server = subprocess.Popen(
        [installed, "-m", "webhook", "serve", "--port", port, "--workers", "1"],
        cwd=tmp_path,
        env={key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "PYTHONPATH")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/readyz", 60)
        sent = _run(
            installed, tmp_path, "send", "customer.created", "--url", f"http://127.0.0.1:{port}/webhooks/stripe"
        )
        assert sent.returncode == 0, sent.stderr
        answer = json.loads(sent.stdout.split(" -> 200 ", 1)[1])
        assert answer["status"] == "processed"
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert "Traceback" not in output, output
    assert (tmp_path / ".data" / "webhook_secret").exists()  # embedded mode, in the folder it ran from
