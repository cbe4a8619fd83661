"""stripe-sync-engine, the peer `bench.run` measures in the same run, in both of its
lines: 0.48.5 (`@supabase/stripe-sync-engine`) and 1.0.32 (`@stripe/sync-engine`). npm-installed
into a scratch folder (Node from Debian's packages when missing) and run by bench/peers/server.cjs,
each on a database of its own. Skipped, with the reason, when any of that fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, text

SCRATCH = Path(tempfile.gettempdir()) / "stripe-webhook-bench-peers"
PEERS_DIR = Path(__file__).resolve().parent / "peers"


@dataclass(frozen=True)
class Peer:
    package: str
    version: str

    @property
    def name(self) -> str:
        return f"stripe-sync-engine {self.version}"

    @property
    def database(self) -> str:
        return "bench_peer_" + self.version.replace(".", "_")


PEERS = (Peer("@supabase/stripe-sync-engine", "0.48.5"), Peer("@stripe/sync-engine", "1.0.32"))


def _installed(peer: Peer) -> bool:
    manifest = SCRATCH / "node_modules" / peer.package / "package.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("version") == peer.version


def install() -> Path | str:
    """The scratch folder's node_modules with every peer in it, or why the peers are skipped."""
    if not (shutil.which("node") and shutil.which("npm")):
        try:
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "nodejs", "npm"], check=True, capture_output=True, timeout=600
            )
        except (OSError, subprocess.SubprocessError) as error:
            return f"no Node (apt-get install nodejs npm failed: {type(error).__name__})"
    if not all(_installed(peer) for peer in PEERS):
        SCRATCH.mkdir(parents=True, exist_ok=True)
        packages = [f"{peer.package}@{peer.version}" for peer in PEERS]
        try:
            subprocess.run(
                ["npm", "install", "--silent", "--prefix", str(SCRATCH), *packages, "stripe"],
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (OSError, subprocess.SubprocessError) as error:
            return f"npm install {' '.join(packages)} failed ({type(error).__name__})"
    return SCRATCH / "node_modules"


def serve(peer: Peer, modules: Path, database_url: str, secret: str, port: int) -> subprocess.Popen[bytes]:
    """The peer, answering on port; RuntimeError with its last error line when it does not start
    (1.0.32's migrations need the btree_gist extension, which the embedded Postgres lacks)."""
    # The child keeps its own descriptor of the file: ours may close once it answers.
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            ["node", str(PEERS_DIR / "server.cjs")],
            env={
                **os.environ,
                "NODE_PATH": str(modules),
                "PEER_PACKAGE": peer.package,
                "OPENAPI_SPEC": str(PEERS_DIR / "customer-openapi.json"),
                "DATABASE_URL": database_url,
                "STRIPE_WEBHOOK_SECRET": secret,
                "PORT": str(port),
            },
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        deadline = time.monotonic() + 60  # the first start runs its migrations
        while time.monotonic() < deadline and process.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", data=b"{}", timeout=1)
            except urllib.error.HTTPError:
                return process  # it answers (400: no signature)
            except OSError:
                time.sleep(0.3)
        process.terminate()
        process.wait()
        errors.seek(0)
        said = [line.strip() for line in errors.read().decode(errors="replace").splitlines() if "error" in line.lower()]
    raise RuntimeError(f"{peer.name} did not start" + (f": {said[0][:200]}" if said else ""))


def customers_written(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM stripe.customers")).scalar_one())
