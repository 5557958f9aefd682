"""An index of a shard directory kept current from file events, so resolving costs O(changes).

``DirectoryIndex`` holds what a ``Resolver`` would find in a directory (ready shards with
their counts and digests, pending shards, rejected files). A watcher (watch.py) reports the
files that were created, moved in or out, modified, closed after writing or deleted; a
background thread re-probes just those with the resolver's own rule (probe.py), so counts,
digests and readiness agree with a rescan. A full rescan runs at start and periodically,
healing events the kernel dropped (queue overflow).

Without a watcher (network file systems, ``poll=``) the index polls instead: a background
rescan every ``poll`` seconds, and a full rescan (stat of every file; indexing only what
changed) when a snapshot is taken.
"""

from __future__ import annotations

import bisect
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from ...core.candidate import Candidate, Pending, Ready, Rejected
from ...core.options import Readiness
from ...core.snapshot import FileId, ShardInfo, Snapshot, shard_key, snapshot_id
from ...format.names import is_temporary
from ..resolver import Resolver
from ..source import NoShardsError
from .inotify import Change
from .probe import WriterSignals
from .sources import DirectorySource
from .watch import Watcher, new_watcher, poll_interval, watch_or_poll

log = logging.getLogger("wdsrefresh")

DEFAULT_POLL = 1.0
DEFAULT_RESCAN = 60.0


@dataclass
class _Entry:
    file_id: FileId | None
    info: ShardInfo | None = None  # ready
    error: BaseException | None = None  # rejected
    reason: str = ""  # pending: why, and when it is looked at again
    key: bytes = b""  # a ready shard's shard_key (what the snapshot id hashes)


_UNCHANGED = object()  # what _probe returns for a file already known in this very version
_REBUILD_AT = 64  # changes applied at once above which the sorted ready lists are rebuilt, not edited


class _Shared:
    """What the background thread and the finalizer share (nothing here references the index)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None
        self.watcher: Watcher | None = None
        self.wake_r, self.wake_w = os.pipe()
        self.pid = os.getpid()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"!")
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if os.getpid() != self.pid:
            return
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
        self.wake()
        thread, self.thread = self.thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


class DirectoryIndex:
    """The ready, pending and rejected shards of a directory, kept current in the background.

    ``snapshot(epoch)`` returns what ``Resolver(source).resolve(epoch)`` would return for the
    directory at the moment it is called (the same shards, order and id), at a cost
    proportional to the files that changed since the previous call. Polling, it stats every
    file instead (indexing only what changed), like a rescan.
    """

    def __init__(
        self,
        source: DirectorySource,
        *,
        rules: Readiness = Readiness(),
        on_invalid: str = "warn",
        poll: bool | float = False,
        backend: str | Callable[[], Watcher] = "auto",
        rescan_interval: float = DEFAULT_RESCAN,
    ):
        if not isinstance(source, DirectorySource):
            raise TypeError(f"a DirectoryIndex watches a directory, not {source.describe()}")
        self.source = source
        self.root = source.path
        self.resolver = Resolver(source, rules, on_invalid)
        self.poll_interval = poll_interval(poll, DEFAULT_POLL)
        self.rescan_interval = rescan_interval
        self.poll = poll
        self.backend = backend
        self.polling = bool(poll)
        self._shared = _Shared()
        self._cond = self._shared.cond
        # under _cond
        self._entries: dict[str, _Entry] = {}
        self._pending: set[str] = set()
        self._rejected: set[str] = set()
        self._ready_urls: list[str] = []  # sorted, like a listing
        self._ready_infos: list[ShardInfo] = []
        self._ready_keys: list[bytes] = []
        self._dirty: set[str] = set()  # settled changes: index in the background
        self._changing: set[str] = set()  # writes under way: look again at the next snapshot
        self._signals = WriterSignals()  # renamed into place or closed, not written since
        self._rescan_wanted = False
        self.version = 0  # bumped on every change to what a snapshot would contain
        self._cached: tuple[int, tuple[ShardInfo, ...], str] | None = None
        self._indexing = threading.Lock()  # one indexer at a time
        self._pump_lock = threading.Lock()  # one reader of the event queue at a time
        self._watched: dict[str, tuple[int, int] | None] = {}  # directory -> (device, inode) watched
        self._started = False
        self.last_rescan = 0.0
        self._finalizer = weakref.finalize(self, self._shared.close)

    @property
    def watcher(self) -> Watcher | None:
        """The watcher in use; None while polling."""
        return self._shared.watcher

    # lifecycle
    def start(self) -> DirectoryIndex:
        """Starts watching (or polling) and runs the first full scan; idempotent."""
        if self._started:
            return self
        if os.getpid() != self._shared.pid:
            raise RuntimeError("a DirectoryIndex cannot be used in a forked child; make a new one")
        if self.closed:
            raise RuntimeError(f"index of {self.source.describe()} is closed")
        if not os.path.isdir(self.root):
            raise NoShardsError(f"shard directory {self.root!r} does not exist")
        watcher, _reason = watch_or_poll(self.root, poll=self.poll, backend=self.backend,
                                         what=self.source.describe())
        self._shared.watcher = watcher
        self.polling = watcher is None
        if watcher is not None:
            self._watched[self.root] = _dir_identity(self.root)
        self._started = True
        self.rescan()  # adds the other watches before listing, so no change falls in between
        thread = threading.Thread(target=_background, args=(weakref.ref(self), self._shared),
                                  name="wdsrefresh-indexer", daemon=True)
        self._shared.thread = thread
        thread.start()
        return self

    def close(self) -> None:
        """Stops the background thread and the watcher; the index is unusable afterwards."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._shared.closed

    def __enter__(self) -> DirectoryIndex:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # events
    def pump(self) -> int:
        """Takes the file events queued so far; returns how many concern shards."""
        watcher = self._shared.watcher
        if watcher is None:
            return 0
        # read and enqueue under one lock: a snapshot's pump() must not slip between another
        # thread's read and its enqueue, or it would see neither the events nor the dirty paths
        with self._pump_lock:
            return self._enqueue(watcher.read())

    def _enqueue(self, changes: list[Change]) -> int:
        n = 0
        with self._cond:
            for change in changes:
                if change.path is None:
                    log.info("%s: %s; rescanning", self.source.describe(),
                             "events were lost" if change.kind == "overflow" else "a directory changed")
                    self._rescan_wanted = True
                elif self.source.would_list(change.path):
                    (self._dirty if change.settled else self._changing).add(change.path)
                    self._signals.record(change.path, change.kind)
                else:
                    continue
                n += 1
            if n:
                self._cond.notify_all()
        return n

    def _add_watches(self) -> None:
        """Watches the directory (and subdirectories); starts afresh if one was swapped (a symlink)."""
        if self._shared.watcher is None:
            return
        dirs = [self.root]
        if self.source.recursive:
            for root, subdirs, _files in os.walk(self.root, followlinks=True):
                subdirs[:] = sorted(d for d in subdirs if not is_temporary(d))
                dirs.extend(os.path.join(root, d) for d in subdirs)
        identities = {d: _dir_identity(d) for d in dirs}
        if any(self._watched.get(d, i) != i for d, i in identities.items()):
            log.info("%s: a watched directory was replaced; watching the new one", self.source.describe())
            old, self._shared.watcher = self._shared.watcher, new_watcher(self.backend)
            old.close()
            self._watched = {}
        for d in dirs:
            if d not in self._watched:
                self._shared.watcher.add(d)
                self._watched[d] = identities[d]

    def _root_replaced(self) -> bool:
        return self._shared.watcher is not None and self._watched.get(self.root) != _dir_identity(self.root)

    # indexing
    def drain(self) -> int:
        """Indexes every file reported changed so far; returns how many."""
        with self._indexing:
            with self._cond:
                dirty, self._dirty = sorted(self._dirty), set()
                rescan, self._rescan_wanted = self._rescan_wanted, False
            if rescan:
                self._rescan_locked()
            self._apply({url: self._probe(url) for url in dirty})
            self.resolver.flush_cache(force=False)
            return len(dirty)

    def rescan(self) -> None:
        """Lists and stats every file; indexes what is new or changed, forgets what is gone."""
        with self._indexing:
            with self._cond:
                self._rescan_wanted = False
                self._dirty.clear()
                self._changing.clear()
            self._rescan_locked()

    def _rescan_locked(self) -> None:
        started = time.monotonic()
        try:
            self._add_watches()
        except OSError as exn:
            if not os.path.isdir(self.root):
                raise NoShardsError(f"shard directory {self.root!r} does not exist") from exn
            log.warning("%s: cannot watch (%s); polling every %.1f s instead", self.source.describe(), exn,
                        self.poll_interval)
            self.polling = True
        try:
            candidates = self.source.candidates()
        except NoShardsError:
            candidates = []
        changes = {cand.url: self._probe(cand.url, cand) for cand in candidates}
        with self._cond:
            gone = [u for u in self._entries if u not in changes]
        changes.update((url, self._probe(url)) for url in gone)
        self._apply(changes)
        self.resolver.flush_cache()
        self.last_rescan = time.monotonic()
        log.debug("%s: full rescan of %d files in %.3f s", self.source.describe(), len(candidates),
                  self.last_rescan - started)

    def _probe(self, url: str, cand: Candidate | None = None) -> _Entry | None | object:
        """What one file is now: an _Entry, None (no such file), or _UNCHANGED when it is ready
        or rejected in this very version already; ``cand`` is the listing's candidate for it
        (else the source makes one)."""
        try:
            st = os.stat(url)
        except OSError:
            st = None
        old = self._entries.get(url)  # only the indexer (under _indexing) changes entries
        if st is not None and old is not None and (old.info or old.error) and old.file_id == FileId.of(st):
            return _UNCHANGED
        outcome = self.resolver.probe(cand or self.source.candidate(url), st=st, seen=self._signals.get(url))
        if outcome is None:
            return None
        if isinstance(outcome, Ready):
            return _Entry(outcome.file_id, info=outcome.info, key=shard_key(outcome.info))
        if isinstance(outcome, Rejected):
            return _Entry(outcome.file_id, error=outcome.error)
        return _Entry(outcome.file_id, reason=outcome.reason)

    def _apply(self, changes: dict[str, _Entry | None | object]) -> None:
        """Records what ``_probe`` found for each url, under one lock and one version bump."""
        changes = {url: entry for url, entry in changes.items() if entry is not _UNCHANGED}
        if not changes:
            return
        with self._cond:
            rebuild = len(changes) > _REBUILD_AT
            changed = False
            for url, entry in changes.items():
                changed |= self._set(url, entry, edit_ready=not rebuild)
            if rebuild:
                ready = sorted((url, e) for url, e in self._entries.items() if e.info is not None)
                self._ready_urls = [url for url, _ in ready]
                self._ready_infos = [e.info for _, e in ready]
                self._ready_keys = [e.key for _, e in ready]
            if changed:
                self.version += 1
                self._cond.notify_all()

    def _set(self, url: str, entry: _Entry | None, edit_ready: bool) -> bool:
        """One url's new entry (under _cond); ``edit_ready``: keep the sorted ready lists current
        (else the caller rebuilds them). Whether anything a snapshot shows changed."""
        old = self._entries.pop(url, None)
        if old is not None and entry is not None and old.info is not None and old.info is entry.info:
            self._entries[url] = entry
            return False
        if entry is None:
            self._signals.forget(url)
        if old is not None:
            self._pending.discard(url)
            self._rejected.discard(url)
            if old.info is not None:
                if edit_ready:
                    i = bisect.bisect_left(self._ready_urls, url)
                    del self._ready_urls[i], self._ready_infos[i], self._ready_keys[i]
                if entry is None or entry.error is not None:  # a pending file's old version
                    self.resolver.forget(old.info.path)  # tells it is being rewritten
        if entry is not None:
            self._entries[url] = entry
            if entry.info is not None:
                if edit_ready:
                    i = bisect.bisect_left(self._ready_urls, url)
                    self._ready_urls.insert(i, url)
                    self._ready_infos.insert(i, entry.info)
                    self._ready_keys.insert(i, entry.key)
                self.resolver.known[entry.info.path] = entry.info
            elif entry.error is not None:
                self._rejected.add(url)
            else:
                self._pending.add(url)
        return old is not None or entry is not None

    # reading
    def snapshot(self, epoch: int) -> Snapshot:
        """The snapshot for ``epoch``, as ``Resolver.resolve`` would make it now; see the class doc."""
        self.start()
        if self.closed:
            raise RuntimeError(f"index of {self.source.describe()} is closed")
        watcher = self._shared.watcher
        if self.polling or watcher is None or watcher.rescan_at_snapshot or self._root_replaced():
            self.rescan()  # a root replaced: e.g. a symlink to the data swapped for a new version
        else:
            self.pump()
            with self._indexing:
                with self._cond:
                    again = self._changing | self._pending
                    self._changing = set()
                    self._dirty |= again
            self.drain()
        with self._cond:
            if self._cached is None or self._cached[0] != self.version:
                shards = tuple(self._ready_infos)
                self._cached = (self.version, shards, snapshot_id(shards, keys=self._ready_keys))
            _, shards, sid = self._cached
            pending = {u: Pending(self._entries[u].file_id, self._entries[u].reason) for u in sorted(self._pending)}
            rejected = [(u, self._entries[u]) for u in sorted(self._rejected)]
        for url, entry in rejected:
            self.resolver.reject(url, Rejected(entry.file_id, entry.error))
        if not shards and not pending and not rejected:
            self.resolver.check_found_any()
        self.resolver.report_pending(pending)
        return Snapshot(epoch, shards, sid, tuple((u, str(e.error)) for u, e in rejected), tuple(pending),
                        pending_reasons={url: p.reason for url, p in pending.items()})

    def counts(self) -> tuple[int, int, int]:
        """(ready, pending, rejected) files as of now."""
        with self._cond:
            return len(self._ready_urls), len(self._pending), len(self._rejected)

    def wait_changed(self, version: int, timeout: float) -> bool:
        """Blocks until the index changed after ``version``, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.version == version and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


def _dir_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _background(ref: weakref.ref, shared: _Shared) -> None:
    """Indexes changed files as events arrive; rescans periodically (every poll interval when polling)."""
    while True:
        index = ref()
        if index is None or shared.closed:
            return
        try:
            index.pump()
            with shared.cond:
                interval = index.poll_interval if index.polling else index.rescan_interval
                wait = index.last_rescan + interval - time.monotonic()
                rescan = index._rescan_wanted or wait <= 0
                busy = bool(index._dirty)
            if rescan:
                index.rescan()
            elif busy:
                index.drain()
        except Exception as exn:  # noqa: BLE001 - keep indexing; the next snapshot reports errors
            log.warning("%s: background indexing failed: %s", index.source.describe(), exn)
            rescan = busy = False
            wait = 1.0
        del index  # hold no reference while idle, so the index can be collected
        if rescan or busy:
            continue
        if shared.closed:
            return
        watcher = shared.watcher
        fds = [shared.wake_r] + ([watcher.fileno()] if watcher is not None and watcher.fileno() >= 0 else [])
        try:
            ready, _, _ = select.select(fds, [], [], max(0.0, min(wait, 5.0)))
        except (OSError, ValueError):  # the watcher was just replaced (or closed)
            continue
        if shared.wake_r in ready:
            try:
                os.read(shared.wake_r, 512)
            except OSError:
                pass
