"""Indexing new objects between epochs, so that resolving the next epoch costs one listing.

Objects published without a manifest entry are indexed once (one streamed, pinned read each)
before they can join a snapshot. Done at ``set_epoch``, that read stalls every rank at the
epoch boundary for as long as the new objects take to stream. So the process that resolves
epochs runs one daemon thread per source: every ``interval`` seconds it lists the source as an
epoch would and indexes, one at a time, the objects whose (URL, ETag) it has not seen. What it
finds is only a cache: the next epoch's listing decides what is in the snapshot, and an entry
is used only for the exact version (ETag) it describes.

The thread pauses while an epoch resolves, holds only a weak reference to its source (it ends
soon after the dataset is dropped), and is never inherited: a forked DataLoader worker has no
copy of it and never resolves epochs.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Protocol

log = logging.getLogger("wdsrefresh")

DEFAULT_INTERVAL = 60.0  # seconds between background listings (a listing costs a request per 1000 keys)
THREAD_NAME = "wdsrefresh-index-ahead"


class Indexable(Protocol):
    def index_ahead_once(self, stop: threading.Event) -> int: ...


class AheadIndexer:
    """The background thread of one source; ``ensure_running`` starts it (again after a fork),
    ``stop`` ends it (the source was closed)."""

    def __init__(self, interval: float):
        if interval < 0:
            raise ValueError(f"index_interval must be >= 0 seconds (0 turns background indexing off), not {interval}")
        self.interval = interval
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pid = 0

    def ensure_running(self, source: Indexable) -> None:
        if self.interval == 0 or self._stop.is_set() or (self._pid == os.getpid() and self._thread is not None
                                                         and self._thread.is_alive()):
            return
        self._pid, self._stop = os.getpid(), threading.Event()
        self._thread = threading.Thread(target=_loop, args=(weakref.ref(source), self._stop, self.interval),
                                        name=THREAD_NAME, daemon=True)
        weakref.finalize(source, self._stop.set)
        self._thread.start()

    def stop(self, wait: float = 0.0) -> None:
        """Ends the thread for good, after its current object; waits up to ``wait`` seconds for it."""
        self._stop.set()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(wait)

    def __getstate__(self) -> dict:
        return {"interval": self.interval}  # a thread is never pickled into a worker

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["interval"])


def _loop(ref: weakref.ref, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        source = ref()
        if source is None:
            return
        try:
            indexed = source.index_ahead_once(stop)
        except Exception as exn:  # noqa: BLE001 - the next epoch's listing reports failures; this only saves reads
            log.debug("background indexing: %s; tried again in %.0f s", exn, interval)
        else:
            if indexed:
                log.debug("background indexing: %d new object(s) indexed ahead of the next epoch", indexed)
        del source
