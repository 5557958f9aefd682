"""One consumer's ranged GETs: what is in flight, what is held, and what may be asked next.

A ``Window`` belongs to one store in one process (a DataLoader worker is one consumer). The
object readers of that process (``blocks.BlockFetcher``: an object open, or prefetched for
later) hand it their wants; its threads fetch block-aligned runs for them. Guarantees:

- Memory: the bytes of blocks fetched and not yet released by their reader, plus the bytes
  requested and not yet arrived, stay within ``memory_budget``; only the GET of a block a
  reader waits for goes past it (so never more than the budget plus one request per reader).
- Order: blocks are requested in the order the consumer needs them: the objects being read
  first (each from the block its reader needs next), then those prefetched, in the order they
  were prefetched. A reader that jumps over blocks never has them requested (except an object
  being indexed, read whole and in order: one stream at a time).
- Several GETs in flight, sized from what they observe: a run of blocks long enough that the
  first-byte latency costs at most a ninth of its transfer (8 x latency x rate, within
  ``request_blocks``: on a loopback server, whose latency is its CPU, few and long GETs); as
  many runs at once as keep their per-stream rate while the reader waits (one more each time;
  one less when the rate falls under half the best seen, a link shared by too many), within
  ``max_requests``. An idle window (no object open) starts again
  at ``START_REQUESTS``: the first batch of an epoch is fetched at full per-connection rate
  rather than sharing the link with everything behind it.
- Threads: one per GET in flight, made on demand; they end when no object is open, and
  closing the last reader joins them.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from time import perf_counter
from typing import Any

from .cache import parse_size

START_REQUESTS = 4  # GETs in flight when a window starts (a batch of 64 x 256 KiB is 4 blocks)
DEFAULT_MAX_REQUESTS = 8  # GETs in flight per consumer at most
DEFAULT_MEMORY_BUDGET = 64 << 20  # bytes per consumer (16 blocks of 4 MiB)
DEFAULT_REQUEST_BLOCKS = 16  # blocks one ranged GET asks for at most
_LATENCY_SHARE = 8  # a run transfers for at least this many first-byte latencies
_GROW_RATE, _SHRINK_RATE = 0.8, 0.5  # of the best per-stream rate seen
_BEST_DECAY = 0.95  # per run: the best rate seen fades, so a slower link is learned again
_JOIN_SECONDS = 10.0


class Window:
    """The GETs of one store's readers in this process (see the module's docstring)."""

    def __init__(self, budget: int, max_requests: int, request_blocks: int, readahead: int | None):
        self.budget, self.max_requests = budget, max_requests
        self.request_blocks, self.readahead = request_blocks, readahead
        self.cond = threading.Condition()
        self.fetchers: list[Any] = []  # registered BlockFetchers, in the order they were registered
        self.held = 0  # bytes of blocks ready and not released
        self.requested = 0  # bytes asked for and not arrived
        self.runs = 0  # GETs in flight
        self.limit = min(START_REQUESTS, max_requests)
        self.latency: float | None = None  # seconds to a response's headers
        self.best_rate = 0.0  # bytes/s of one stream, fading
        self.waited = False  # a reader waited for a block since the limit last grew
        self.threads: list[threading.Thread] = []
        self.idle = 0  # threads waiting for a job

    # ------------------------------------------------------------------ readers' side (under cond)
    def add(self, fetcher: Any) -> None:
        with self.cond:
            if not self.fetchers:  # idle until now: a new start
                self.limit = min(START_REQUESTS, self.max_requests)
            if fetcher not in self.fetchers:
                self.fetchers.append(fetcher)
            self._dispatch()

    def remove(self, fetcher: Any) -> list[threading.Thread]:
        """Forgets ``fetcher`` (its blocks already dropped); the threads to join when it was the last."""
        with self.cond:
            if fetcher in self.fetchers:
                self.fetchers.remove(fetcher)
            self.cond.notify_all()
            if self.fetchers:
                return []
            return [t for t in self.threads if t is not threading.current_thread()]

    def changed(self) -> None:
        """(Under cond.) A reader released blocks, moved on, or waits: a job may be possible now."""
        self._dispatch()

    # ------------------------------------------------------------------ choosing the next run (under cond)
    def _run_blocks(self) -> int:
        """How many blocks one run asks for: enough to make the latency small against its transfer."""
        if self.latency is None or not self.best_rate:
            return 1
        blocks = math.ceil(_LATENCY_SHARE * self.latency * self.best_rate / self._block_size())
        fit = max(1, self.budget // (self._block_size() * self.limit))  # ``limit`` runs fit in the budget
        return max(1, min(blocks, self.request_blocks, fit))

    def _run_size(self, f: Any, i: int) -> int:
        """Blocks of a run from block ``i`` of ``f``, before the budget's bound."""
        if f.record is not None:
            return self.request_blocks
        size = self._run_blocks()
        if f.run_limit(i) == size + 1 and f.length(f.nblocks - 1) <= f.block_size // 2:
            size += 1  # a short last block goes with the run before it: a GET of its own would cost a slot
        return size

    def _block_size(self) -> int:
        return self.fetchers[0].block_size if self.fetchers else 1 << 22

    def _ordered(self) -> list[Any]:
        return sorted(self.fetchers, key=lambda f: not f.opened)  # stable: registration order within each

    def _job(self) -> tuple[Any, int, int] | None:
        """The next run to fetch, ``(fetcher, first, stop)``: a block a reader waits for (past the
        limits), else the first block anyone will need, within them."""
        ordered = self._ordered()
        for f in ordered:
            i = f.urgent()
            if i is not None:
                return f, i, i + min(self._run_size(f, i), f.run_limit(i))
        if self.runs >= self.limit:
            return None
        room = self.budget - self.held - self.requested
        ahead = None if self.readahead is None else self.readahead - sum(f.ahead() for f in ordered)
        for f in ordered:
            i = f.wants_next()
            if i is None:
                continue
            blocks = min(self._run_size(f, i), f.run_limit(i), room // f.block_size)
            if ahead is not None:
                blocks = min(blocks, ahead)
            return (f, i, i + blocks) if blocks >= 1 else None  # in need order: nothing later goes first
        return None

    def _dispatch(self) -> None:
        """(Under cond.) Wakes a thread for a job, or makes one."""
        if self.idle:
            self.cond.notify_all()
        elif len(self.threads) <= self.max_requests and self._job() is not None:
            thread = threading.Thread(target=self._serve, name="wdsrefresh-readahead", daemon=True)
            self.threads.append(thread)
            thread.start()

    # ------------------------------------------------------------------ the threads
    def _serve(self) -> None:
        try:
            while True:
                with self.cond:
                    while True:
                        if not self.fetchers:
                            return
                        job = self._job()
                        if job is not None:
                            break
                        self.idle += 1
                        self.cond.wait()
                        self.idle -= 1
                    fetcher, first, stop = job
                    fetcher.claim(first, stop)
                    self.requested += sum(fetcher.length(i) for i in range(first, stop))
                    self.runs += 1
                    self._dispatch()  # another job may wait for another thread
                self._fetch(fetcher, first, stop)
        finally:
            with self.cond:
                self.threads.remove(threading.current_thread())

    def _fetch(self, fetcher: Any, first: int, stop: int) -> None:
        started = perf_counter()
        opened: list[float] = []
        done = first
        try:
            done = fetcher.fetch_run(first, stop, lambda: opened.append(perf_counter()))
        finally:
            ended = perf_counter()
            with self.cond:
                self.requested -= sum(fetcher.length(i) for i in range(done, stop))  # what never came
                self.runs -= 1
                streamed = sum(fetcher.length(i) for i in range(first, done))
                if opened and streamed >= fetcher.block_size // 2 and ended > opened[0]:  # a short tail times nothing
                    self._observe(opened[0] - started, streamed / (ended - opened[0]))
                self.cond.notify_all()

    def _observe(self, latency: float, rate: float) -> None:
        """(Under cond.) One run's first-byte latency and per-stream rate."""
        self.latency = latency if self.latency is None else 0.7 * self.latency + 0.3 * latency
        self.best_rate = max(rate, self.best_rate * _BEST_DECAY)
        if rate >= _GROW_RATE * self.best_rate and self.waited and self.runs + 1 >= self.limit:
            self.limit = min(self.limit + 1, self.max_requests)
            self.waited = False
        elif rate < _SHRINK_RATE * self.best_rate:
            self.limit = max(self.limit - 1, 1)

    # ------------------------------------------------------------------ accounting, from fetchers (under cond)
    def arrived(self, nbytes: int, kept: bool) -> None:
        self.requested -= nbytes
        if kept:
            self.held += nbytes

    def released(self, nbytes: int) -> None:
        self.held -= nbytes


def read_options(options: dict, pop: bool = False) -> tuple[int | None, int, int, int]:
    """``readahead`` (None: the budget's bound only), ``request_blocks``, ``memory_budget`` (bytes,
    or a size such as ``"64MiB"``) and ``max_requests`` from a store's ``storage_options``,
    checked; ``pop`` takes them out."""
    get = options.pop if pop else options.get
    readahead = get("readahead", None)
    readahead = None if readahead is None else int(readahead)
    request_blocks = int(get("request_blocks", DEFAULT_REQUEST_BLOCKS))
    budget = parse_size(get("memory_budget", DEFAULT_MEMORY_BUDGET), "memory_budget")
    max_requests = int(get("max_requests", DEFAULT_MAX_REQUESTS))
    if min(request_blocks, max_requests) < 1 or (readahead is not None and readahead < 0):
        raise ValueError("storage_options: request_blocks and max_requests must be >= 1, readahead >= 0")
    return readahead, request_blocks, budget, max_requests


_windows: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> its Window in this process
_windows_lock = threading.Lock()


def _forget_in_child() -> None:  # a forked child (a DataLoader worker) inherits windows, not their threads
    global _windows_lock
    _windows.clear()
    _windows_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def window_of(store: Any) -> Window:
    """``store``'s window in this process, made on first use."""
    with _windows_lock:
        window = _windows.get(store)
        if window is None:
            window = _windows[store] = Window(store.memory_budget, store.max_requests, store.request_blocks,
                                              store.readahead)
        return window
