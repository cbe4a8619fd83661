"""`prune`: the event log's retention. Settled events (processed, ignored, stale) older than the
cutoff go, a small batch a transaction so deliveries never wait behind it; failed and received
events stay for replay, and deletion tombstones live in their own table, so a pruned customer.deleted
still keeps its customer from coming back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from webhook import jobs_store

BATCH = 1000
PAUSE_SECONDS = 0.005  # between batches: room for deliveries on a busy database
# Shorter than this is a typo (7m for 7d), not a retention: nothing is deleted.
MIN_AGE_SECONDS = 86400


class PruneRefused(Exception):
    """The cutoff is implausible; nothing was deleted."""


@dataclass(frozen=True)
class Pruned:
    deleted: int
    cutoff: int
    dry_run: bool

    def line(self) -> str:
        before = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.cutoff))
        verb = "would prune" if self.dry_run else "pruned"
        return (
            f"{verb} {self.deleted} settled events received before {before} "
            "(failed and received events and every deletion tombstone kept)"
        )


def prune(
    engine: Engine,
    older_than: int,
    dry_run: bool = False,
    progress: Callable[[int, int], None] = lambda done, total: None,
    stop: threading.Event | None = None,
) -> Pruned:
    if older_than < MIN_AGE_SECONDS:
        raise PruneRefused(f"events younger than a day are not a retention ({older_than} s asked); nothing deleted")
    cutoff = int(time.time()) - older_than
    total = jobs_store.count_prunable(engine, cutoff)
    if dry_run:
        return Pruned(total, cutoff, dry_run=True)
    deleted = 0
    while not (stop and stop.is_set()) and (batch := jobs_store.prune_batch(engine, cutoff, BATCH)):
        deleted += batch
        progress(deleted, max(total, deleted))
        time.sleep(PAUSE_SECONDS)
    return Pruned(deleted, cutoff, dry_run=False)
