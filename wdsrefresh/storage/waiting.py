"""Waiting for ``min_shards``: a source resolved again until its snapshot lists enough ready
shards, whichever backend it reads (a watched directory's index wakes the wait on a change)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ..core.snapshot import Snapshot
from ..errors import WdsRefreshError
from .source import NoShardsError

log = logging.getLogger("wdsrefresh")

DEFAULT_POLL = 1.0
WAIT_REPORT_INTERVAL = 30.0  # seconds between WARNINGs while min_shards waits


class NotEnoughShardsError(WdsRefreshError, TimeoutError):
    """Fewer ready shards than ``min_shards`` appeared before the timeout."""


def resolve_waiting(
    resolve_once: Callable[[], Snapshot],
    *,
    describe: str,
    min_shards: int,
    timeout: float | None,
    index: Any = None,
    poll: float = DEFAULT_POLL,
) -> Snapshot:
    """``resolve_once()``, repeated until its snapshot lists ``min_shards`` ready shards.

    Between attempts it sleeps until ``index`` (a watched directory's DirectoryIndex) reports a
    change, or ``poll`` seconds pass (without one). Raises NotEnoughShardsError after ``timeout`` seconds (None: never),
    naming what was found: ready, pending and rejected shards. With ``min_shards <= 0`` it
    resolves once, and a source with no shard at all raises NoShardsError as usual.
    """
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    next_word = started  # when the wait is next reported
    while True:
        version = index.version if index is not None else 0
        try:
            snapshot: Snapshot | None = resolve_once()
        except NoShardsError:
            if min_shards <= 0:
                raise
            snapshot = None
        if min_shards <= 0 or (snapshot is not None and len(snapshot.shards) >= min_shards):
            return snapshot
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise NotEnoughShardsError(_shortage(describe, snapshot, min_shards, time.monotonic() - started))
        if time.monotonic() >= next_word:
            until = "without a timeout" if deadline is None else f"for at most {remaining:.0f} s more"
            log.warning("waiting for min_shards=%d, %s: %s", min_shards, until,
                        _shortage(describe, snapshot, min_shards, time.monotonic() - started))
            next_word += WAIT_REPORT_INTERVAL
        step = poll if remaining is None else min(poll, remaining)
        if index is not None and not index.polling:
            index.wait_changed(version, step)
        else:
            time.sleep(step)


def _shortage(describe: str, snapshot: Snapshot | None, min_shards: int, waited: float) -> str:
    ready = len(snapshot.shards) if snapshot is not None else 0
    pending = snapshot.pending if snapshot is not None else ()
    rejected = snapshot.rejected if snapshot is not None else ()
    text = (f"{describe}: {ready} ready shards after waiting {waited:.1f} s, need {min_shards}; "
            f"{len(pending)} pending (incomplete or still being written)")
    if pending:
        text += ": " + ", ".join(os.path.basename(p) for p in pending[:5]) + (", ..." if len(pending) > 5 else "")
    text += f"; {len(rejected)} rejected"
    if rejected:
        text += ": " + "; ".join(f"{os.path.basename(u)} ({why})" for u, why in rejected[:5])
    return text
