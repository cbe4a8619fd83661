"""stripe-sync-engine, the peer `bench.run` measures in the same run (issue 12): npm-installed into a
scratch folder (Node from Debian's packages when missing), run by bench/peers/server.cjs on a
database of its own. Skipped, with the reason, when any of that fails. 1.0.32 (`@stripe/sync-engine`)
is not wired yet: it calls the Stripe API at start and its migrations download Stripe's OpenAPI spec.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from sqlalchemy import Engine, text

PACKAGE = "@supabase/stripe-sync-engine@0.48.5"
NAME = "stripe-sync-engine 0.48.5"
SCRATCH = Path(tempfile.gettempdir()) / "stripe-webhook-bench-peers"
SERVER = Path(__file__).resolve().parent / "peers" / "server.cjs"


def install() -> Path | str:
    """The scratch folder's node_modules, or why the peer is skipped."""
    if not (shutil.which("node") and shutil.which("npm")):
        try:
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "nodejs", "npm"], check=True, capture_output=True, timeout=600
            )
        except (OSError, subprocess.SubprocessError) as error:
            return f"no Node (apt-get install nodejs npm failed: {type(error).__name__})"
    modules = SCRATCH / "node_modules"
    if not (modules / "@supabase" / "stripe-sync-engine").exists():
        SCRATCH.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(
                ["npm", "install", "--silent", "--prefix", str(SCRATCH), PACKAGE, "stripe"],
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (OSError, subprocess.SubprocessError) as error:
            return f"npm install {PACKAGE} failed ({type(error).__name__})"
    return modules


def serve(modules: Path, database_url: str, secret: str, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["node", str(SERVER)],
        env={
            **os.environ,
            "NODE_PATH": str(modules),
            "DATABASE_URL": database_url,
            "STRIPE_WEBHOOK_SECRET": secret,
            "PORT": str(port),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60  # the first start runs its migrations
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", data=b"{}", timeout=1)
        except urllib.error.HTTPError:
            return process  # it answers (400: no signature)
        except OSError:
            time.sleep(0.3)
    process.terminate()
    raise RuntimeError(f"{NAME} did not start")


def customers_written(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM stripe.customers")).scalar_one())
