"""``stats_dir=``: each epoch's EpochStats as one line of ``stats.jsonl``, written by the main
process of every rank at the next ``set_epoch``, ``close()``, garbage collection or exit."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import weakref
from typing import Any

from ..epoch.stats import EpochStats

log = logging.getLogger("wdsrefresh")

STATS_FILE = "stats.jsonl"


class StatsLog:
    """``DIR/stats.jsonl``: one JSON line (``EpochStats.to_dict()``) per epoch and rank.

    Every rank's main process appends to the same file: each line is one ``write`` on a
    descriptor opened with O_APPEND, under an fcntl lock (which NFS honours), so lines from
    several ranks never interleave.
    """

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, STATS_FILE)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exn:
            raise OSError(exn.errno, f"stats_dir {self.directory}: {exn.strerror}") from None

    def append(self, stats: EpochStats) -> None:
        line = (json.dumps(stats.to_dict(), separators=(",", ":")) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exn:
            raise OSError(exn.errno, f"{self.path}: cannot append the stats of epoch {stats.epoch}: "
                                     f"{exn.strerror}") from None


def read_jsonl(path: str) -> list[EpochStats]:
    """The EpochStats lines of ``path`` (a stats.jsonl, or a directory holding one), in file order.
    Raises ValueError naming the file and line for a line that is not a JSON object."""
    if os.path.isdir(path):
        path = os.path.join(path, STATS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: give a stats_dir= directory or its {STATS_FILE}")
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exn:
                raise ValueError(f"{path}: line {number}: not JSON ({exn})") from None
            if not isinstance(doc, dict) or "epoch" not in doc:
                raise ValueError(f"{path}: line {number}: not an epoch's stats (no 'epoch')")
            out.append(EpochStats.from_dict(doc))
    return out


class StatsRecorder:
    """The main process's side of ``stats_dir=`` and ``wr.timed``: the training loop's timing
    per epoch, and each epoch's line in ``stats.jsonl``.

    An epoch's line is appended once, at the first of: ``flush`` after it (the next
    ``set_epoch``, ``close()``), the end of the recorder (the last dataset sharing it garbage
    collected) or interpreter exit; with every field known then. ``source`` is the dataset's
    EpochSource, never the dataset itself, so the hook keeps no dataset alive. Lives in the
    dataset; workers' copies write nothing.
    """

    def __init__(self, stats_dir: str | None, source: Any = None):
        self.log = StatsLog(stats_dir) if stats_dir is not None else None
        self.logged: set[int] = set()
        self.loops: dict[int, dict] = {}
        self.source = source
        if self.log is not None and source is not None:
            # created after the source's own finalizer (its state directory's removal), so at
            # exit it runs first: finalizers run newest first
            weakref.finalize(self, _flush_at_end, self.log, source, self.loops, self.logged)

    def record_loop(self, epoch: int, batches: int, seconds: float, wait_seconds: float) -> None:
        """Adds one pass of a timed loop to ``epoch``'s (several passes in one epoch add up)."""
        loop = self.loops.setdefault(epoch, {"batches": 0, "seconds": 0.0, "wait_seconds": 0.0})
        loop["batches"] += batches
        loop["seconds"] += seconds
        loop["wait_seconds"] += wait_seconds
        for old in sorted(self.loops)[:-16]:
            del self.loops[old]

    def joined(self, stats: EpochStats) -> EpochStats:
        """``stats`` with what the timed loop saw of its epoch, if it saw it."""
        return with_loop(stats, self.loops)

    def flush(self, before: int | None = None) -> None:
        """Appends the line of each published epoch not logged yet (only those < ``before``)."""
        if self.log is not None and self.source is not None:
            _flush(self.log, self.source, self.loops, self.logged, before)


def with_loop(stats: EpochStats, loops: dict[int, dict]) -> EpochStats:
    """``stats`` with the timed loop's pass over its epoch (``loops``: per epoch), if any."""
    loop = loops.get(stats.epoch)
    if loop is None:
        return stats
    return dataclasses.replace(stats, batches=loop["batches"], loop_seconds=loop["seconds"],
                               wait_seconds=loop["wait_seconds"])


def _flush(stats_log: StatsLog, source: Any, loops: dict[int, dict], logged: set[int],
           before: int | None = None) -> None:
    if os.getpid() != source.statedir.owner_pid:
        return  # a worker's copy: the main process logs
    for epoch in sorted(source.statedir.published_epochs()):
        if epoch in logged or (before is not None and epoch >= before):
            continue
        stats_log.append(with_loop(source.stats(epoch), loops))
        logged.add(epoch)


def _flush_at_end(stats_log: StatsLog, source: Any, loops: dict[int, dict], logged: set[int]) -> None:
    try:
        _flush(stats_log, source, loops, logged)
    except Exception as exn:  # at exit or in garbage collection: nobody to raise to
        log.warning("%s: the stats lines of the last epochs were not written: %s", stats_log.path, exn)
