"""A/B of the common path (figures, not assertions): `python -m bench.ab REV`.

The consumer at git revision REV (checked out into a temporary worktree) and the working tree, each
on its own database of one embedded Postgres, under the same gunicorn settings and the same wrk
load (distinct signed customer.updated events, no ties), alternating rounds so that the machine's
drift hits both alike. Prints events/s and CPU per event of the workers and of Postgres per round
and the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import cluster
from bench.run import SECRET, _free_port, _full_load, _scratch_database, _serve, _settle, _table
from webhook.database import make_engine

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """The revision checked out into a temporary folder, removed after."""
    folder = Path(tempfile.mkdtemp(prefix="bench-tree-")) / "tree"
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "-q", "--detach", str(folder), revision], check=True)
    try:
        yield folder
    finally:
        subprocess.run([*git, "remove", "--force", str(folder)], check=False)


def migrated_database(server_url: str, name: str, tree: Path) -> tuple[str, dict[str, str]]:
    """A fresh database with the schema of `tree`, and the environment that runs that tree's code on it."""
    url = _scratch_database(server_url, name)
    env = {**os.environ, "PYTHONPATH": str(tree), "DATABASE_URL": url, "STRIPE_WEBHOOK_SECRET": SECRET}
    subprocess.run([sys.executable, "-m", "webhook", "db", "migrate", "--shim"], env=env, cwd=tree, check=True)
    return url, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="the git revision to compare the working tree with")
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=20000, help="without wrk: events per round")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--postgres-bin", type=Path, help="run a scratch cluster of these server binaries")
    args = parser.parse_args()

    server_url = cluster.server(args.postgres_bin, None)
    sides: dict[str, dict[str, Any]] = {}
    with worktree(args.revision) as old_tree:
        for side, tree in (("old", old_tree), ("new", ROOT)):
            url, env = migrated_database(server_url, f"bench_{side}", tree)
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            sides[side] = {"env": env, "engine": make_engine(url, 1), "rows": [], "tree": tree}
        for round_number in range(args.rounds):
            for side in ("old", "new") if round_number % 2 == 0 else ("new", "old"):
                port = _free_port()
                process = _serve(
                    "webhook.app:create_app()", port, sides[side]["env"], args.workers, sides[side]["tree"]
                )
                try:
                    row = _full_load(port, process, args, sides[side]["engine"])
                finally:
                    process.terminate()
                    process.wait(30)
                sides[side]["rows"].append({"side": side, "round": round_number + 1, **row})
                print(_table([sides[side]["rows"][-1]]).splitlines()[-1], flush=True)
                _settle(sides[side]["engine"])
        keys = ("events/s", "server CPU ms/event", "postgres CPU ms/event", "total CPU ms/event", "WAL bytes/event")
        medians = [
            {"side": f"{side} ({args.revision if side == 'old' else 'working tree'})"}
            | {key: statistics.median(row[key] for row in sides[side]["rows"]) for key in keys}
            for side in ("old", "new")
        ]
        print(f"\nmedian of {args.rounds} rounds, {args.seconds:.0f} s each, {args.connections} connections (wrk)")
        # The machine drifts between rounds: each round's new side against the old side of the same round.
        pairs = list(zip(sides["old"]["rows"], sides["new"]["rows"], strict=True))
        paired = {key: statistics.median(new[key] / old[key] - 1 for old, new in pairs) for key in keys}
        ratios = {key: f"{value:+.1%}" for key, value in paired.items()}
        medians.append({"side": "new vs old, median of the rounds' ratios"} | ratios)
        print(_table(medians))


if __name__ == "__main__":
    main()
