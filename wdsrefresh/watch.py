"""An index of a shard directory kept current from file events, so resolving costs O(changes).

``DirectoryIndex`` holds what a ``Resolver`` would find in a directory (ready shards with
their counts and digests, pending shards, rejected files). inotify, read directly (not through
watchdog, whose event threads could not promise that an event queued before ``snapshot()``
is seen by it), reports the files that were created, moved in or out, modified, closed after
writing or deleted; a background thread re-indexes just those, with the resolver's own per-file logic
(``Resolver.info``), so counts, digests and readiness agree with a rescan. A full rescan
runs at start and periodically, healing events inotify lost (queue overflow).

Where inotify does not work (network file systems, exhausted inotify limits, or when asked
with ``poll=``) the index polls instead: a background rescan every ``poll`` seconds, and a
full rescan (stat of every file; indexing only what changed) when a snapshot is taken.

Watches belong to the process that resolves snapshots: they are started lazily (never
at import), are not carried into forked children (their fds are closed there), and stop on
``close()``, on garbage collection, or at interpreter exit.
"""

from __future__ import annotations

import bisect
import select
import stat
import struct
import sys
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .snapshot import Handler, Resolver, ShardInfo, Snapshot, shard_key, snapshot_id
from .format.names import SHARD_PATTERNS, is_shard_name, is_temporary
from .sources import DirectorySource, NoShardsError, ShardSource
from .format.tario import ShardChangedError, TarError

log = logging.getLogger("wdsrefresh")

DEFAULT_POLL = 1.0
DEFAULT_RESCAN = 60.0
# File systems whose changes made by other hosts inotify never reports.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "afs", "ceph", "glusterfs", "lustre",
    "gpfs", "beegfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.glusterfs",
    "fuse.cephfs", "fuse.rclone", "fuse.mountpoint-s3", "fuse.goofys", "wekafs",
})


class NotEnoughShardsError(TimeoutError):
    """Fewer ready shards than ``min_shards`` appeared before the timeout."""


def poll_reason(path: str) -> str | None:
    """Why inotify cannot be trusted for ``path`` (a network file system), or None."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    real = os.path.realpath(path)
    best, fstype = "", None
    for mountpoint, kind in mounts:
        mountpoint = mountpoint.replace("\\040", " ")
        inside = real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/")
        if inside and len(mountpoint) >= len(best):
            best, fstype = mountpoint, kind
    if fstype in NETWORK_FS:
        return f"{path!r} is on a {fstype} file system, whose remote changes inotify does not report"
    return None


def is_candidate_path(root: str, path: str, recursive: bool) -> bool:
    """Whether a DirectorySource on ``root`` would list ``path`` (by name only)."""
    rel = os.path.relpath(path, root)
    if rel.startswith(".."):
        return False
    parts = rel.split(os.sep)
    if not recursive and len(parts) != 1:
        return False
    return is_shard_name(parts[-1]) and not any(is_temporary(p) for p in parts[:-1])


# -- inotify ------------------------------------------------------------------------------
#
# The kernel API directly, rather than a watchdog observer: watchdog hands each event through
# three threads (reader, emitter, observer) before a handler sees it, so a resolve could never
# tell whether it has seen every event queued before it began. Reading the inotify fd
# without blocking lets ``snapshot()`` drain the kernel queue itself: a shard renamed into
# the directory before ``set_epoch`` is called is in that epoch's snapshot, always.

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ONLYDIR, IN_ISDIR = 0x01000000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, getattr(os, "O_CLOEXEC", 0o2000000)
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")

_LIVE: weakref.WeakSet[Inotify] = weakref.WeakSet()


def _libc():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return libc, ctypes


@dataclass(frozen=True)
class Change:
    """One inotify event: ``path`` None means only a full rescan can tell what changed."""

    path: str | None
    mask: int

    @property
    def settled(self) -> bool:
        """A change after which the file is worth indexing (not a write still under way)."""
        return bool(self.mask & ~IN_MODIFY)


class Inotify:
    """A non-blocking inotify instance on some directories (Linux); raises OSError if unavailable."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError("inotify is Linux only")
        self._libc, ctypes = _libc()
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)} (see /proc/sys/fs/inotify/max_user_instances)")
        self.fd = fd
        self.pid = os.getpid()
        self.dirs: dict[int, str] = {}
        self._lock = threading.Lock()
        _LIVE.add(self)

    def add(self, directory: str) -> None:
        """Watches ``directory`` (not its subdirectories)."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), WATCH_MASK | IN_ONLYDIR)
        if wd < 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch({directory!r}): {os.strerror(err)} "
                               f"(see /proc/sys/fs/inotify/max_user_watches)")
        self.dirs[wd] = directory

    def read(self) -> list[Change]:
        """The events queued so far (never blocks)."""
        out: list[Change] = []
        with self._lock:
            if self.fd < 0:
                return out
            while True:
                try:
                    buf = os.read(self.fd, 1 << 16)
                except BlockingIOError:
                    return out
                pos = 0
                while pos + _EVENT.size <= len(buf):
                    wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                    name = buf[pos + _EVENT.size: pos + _EVENT.size + length].rstrip(b"\0")
                    pos += _EVENT.size + length
                    directory = self.dirs.get(wd)
                    if mask & IN_Q_OVERFLOW:
                        out.append(Change(None, mask))
                    elif mask & IN_IGNORED:
                        self.dirs.pop(wd, None)
                    elif directory is None:
                        continue
                    elif mask & (IN_DELETE_SELF | IN_MOVE_SELF) or (mask & IN_ISDIR and name):
                        out.append(Change(None, mask))
                    elif name:
                        out.append(Change(os.path.join(directory, os.fsdecode(name)), mask))

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0 and os.getpid() == self.pid:
            os.close(fd)
        _LIVE.discard(self)


def _close_inherited() -> None:
    """In a forked child: close the inotify fds the parent's watchers hold (their threads are gone)."""
    for ino in list(_LIVE):
        fd, ino.fd = ino.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        ino._lock = threading.Lock()
    _LIVE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


# -- the index ---------------------------------------------------------------------------


@dataclass
class _Entry:
    identity: tuple[int, int, int, int]
    info: ShardInfo | None = None  # ready
    error: BaseException | None = None  # rejected


class _IndexState:
    """What the background thread and the finalizer share (nothing here references the index)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None
        self.inotify: Inotify | None = None
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
        inotify, self.inotify = self.inotify, None
        if inotify is not None:
            inotify.close()
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
        source: ShardSource,
        *,
        with_digest: bool = True,
        handler: Handler | None = None,
        poll: bool | float = False,
        rescan_interval: float = DEFAULT_RESCAN,
    ):
        if not isinstance(source, DirectorySource):
            raise TypeError(f"a DirectoryIndex watches a directory, not {source.describe()}")
        self.source = source
        self.root = source.path
        self.resolver = Resolver(source, with_digest=with_digest, handler=handler)
        self.poll_interval = (DEFAULT_POLL if poll is True else float(poll)) if poll else DEFAULT_POLL
        self.rescan_interval = rescan_interval
        self.polling = bool(poll)
        self.poll_reason = "asked for (poll=...)" if poll else None
        self._state = _IndexState()
        self._cond = self._state.cond
        # under _cond
        self._entries: dict[str, _Entry] = {}
        self._pending: set[str] = set()
        self._rejected: set[str] = set()
        self._ready_urls: list[str] = []  # sorted, like a listing
        self._ready_infos: list[ShardInfo] = []
        self._ready_keys: list[bytes] = []
        self._dirty: set[str] = set()  # settled changes: index in the background
        self._changing: set[str] = set()  # writes under way: look again at the next snapshot
        self._rescan_wanted = False
        self.version = 0  # bumped on every change to what a snapshot would contain
        self._cached: tuple[int, tuple[ShardInfo, ...], str] | None = None
        self._indexing = threading.Lock()  # one indexer at a time
        self._pump_lock = threading.Lock()  # one reader of the inotify queue at a time
        self._watched: dict[str, tuple[int, int] | None] = {}  # directory -> (device, inode) watched
        self._started = False
        self.last_rescan = 0.0
        self.events = 0
        self._finalizer = weakref.finalize(self, self._state.close)

    # lifecycle
    def start(self) -> DirectoryIndex:
        """Starts watching (or polling) and runs the first full scan; idempotent."""
        if self._started:
            return self
        if os.getpid() != self._state.pid:
            raise RuntimeError("a DirectoryIndex cannot be used in a forked child; make a new one")
        if self.closed:
            raise RuntimeError(f"index of {self.source.describe()} is closed")
        if not os.path.isdir(self.root):
            raise NoShardsError(f"shard directory {self.root!r} does not exist")
        if not self.polling:
            reason = poll_reason(self.root)
            if reason is None:
                try:
                    self._state.inotify = Inotify()
                except OSError as exn:
                    reason = f"inotify is unavailable ({exn})"
            if reason is not None:
                log.warning("%s: polling every %.1f s instead of watching: %s", self.source.describe(),
                            self.poll_interval, reason)
                self.polling, self.poll_reason = True, reason
        self._started = True
        self.rescan()  # adds the watches before listing, so no change falls in between
        thread = threading.Thread(target=_background, args=(weakref.ref(self), self._state),
                                  name="wdsrefresh-indexer", daemon=True)
        self._state.thread = thread
        thread.start()
        return self

    def close(self) -> None:
        """Stops the background thread and the inotify watches; the index is unusable afterwards."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._state.closed

    def __enter__(self) -> DirectoryIndex:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # events
    def pump(self) -> int:
        """Takes the file events queued in the kernel so far; returns how many concern shards."""
        inotify = self._state.inotify
        if inotify is None:
            return 0
        # read and enqueue under one lock: a snapshot's pump() must not slip between another
        # thread's read and its enqueue, or it would see neither the events nor the dirty paths
        with self._pump_lock:
            changes = inotify.read()
            return self._enqueue(changes)

    def _enqueue(self, changes: list[Change]) -> int:
        n = 0
        with self._cond:
            for change in changes:
                if change.path is None:
                    log.info("%s: %s; rescanning", self.source.describe(),
                             "inotify queue overflowed" if change.mask & IN_Q_OVERFLOW else "directory changed")
                    self._rescan_wanted = True
                elif is_candidate_path(self.root, change.path, self.source.recursive):
                    (self._dirty if change.settled else self._changing).add(change.path)
                else:
                    continue
                n += 1
            self.events += n
            if n:
                self._cond.notify_all()
        return n

    def _add_watches(self) -> None:
        """Watches the directory (and subdirectories); starts afresh if one was swapped (a symlink)."""
        if self._state.inotify is None:
            return
        dirs = [self.root]
        if self.source.recursive:
            for root, subdirs, _files in os.walk(self.root, followlinks=True):
                subdirs[:] = sorted(d for d in subdirs if not is_temporary(d))
                dirs.extend(os.path.join(root, d) for d in subdirs)
        identities = {d: _dir_identity(d) for d in dirs}
        if any(self._watched.get(d, i) != i for d, i in identities.items()):
            log.info("%s: a watched directory was replaced; watching the new one", self.source.describe())
            old, self._state.inotify = self._state.inotify, Inotify()
            old.close()
            self._watched = {}
        for d in dirs:
            if d not in self._watched:
                self._state.inotify.add(d)
                self._watched[d] = identities[d]

    def _root_replaced(self) -> bool:
        return self._state.inotify is not None and self._watched.get(self.root) != _dir_identity(self.root)

    # indexing
    def drain(self) -> int:
        """Indexes every file reported changed so far; returns how many."""
        with self._indexing:
            with self._cond:
                dirty, self._dirty = sorted(self._dirty), set()
                rescan, self._rescan_wanted = self._rescan_wanted, False
            if rescan:
                self._rescan_locked()
            for url in dirty:
                self._refresh(url)
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
            self.polling, self.poll_reason = True, str(exn)
        try:
            candidates = self.source.candidates()
        except NoShardsError:
            candidates = []
        urls = {c.url for c in candidates}
        for cand in candidates:
            self._refresh(cand.url)
        with self._cond:
            gone = [u for u in self._entries if u not in urls]
        for url in gone:
            self._refresh(url)
        self.last_rescan = time.monotonic()
        log.debug("%s: full rescan of %d files in %.3f s", self.source.describe(), len(candidates),
                  self.last_rescan - started)

    def _refresh(self, url: str) -> None:
        """Re-reads one file's state, with the resolver's per-file logic."""
        try:
            st = os.stat(url)
        except FileNotFoundError:
            self._set(url, None)
            return
        except OSError as exn:
            self._set(url, _Entry((0, 0, 0, 0), error=exn))
            return
        if not stat.S_ISREG(st.st_mode):
            self._set(url, None)
            return
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._cond:
            old = self._entries.get(url)
        if old is not None and old.identity == identity and (old.info is not None or old.error is not None):
            return  # unchanged since it was indexed; pending files are looked at again
        try:
            info = self.resolver.info(self.source.candidate(url))
        except FileNotFoundError:
            self._set(url, None)
            return
        except (TarError, ShardChangedError, OSError) as exn:
            self._set(url, _Entry(identity, error=exn))
            return
        self._set(url, _Entry(info.identity if info is not None else identity, info=info))

    def _set(self, url: str, entry: _Entry | None) -> None:
        with self._cond:
            old = self._entries.pop(url, None)
            if old is not None and entry is not None and old.info is not None and old.info is entry.info:
                self._entries[url] = entry
                return
            if old is not None:
                self._pending.discard(url)
                self._rejected.discard(url)
                if old.info is not None:
                    i = bisect.bisect_left(self._ready_urls, url)
                    del self._ready_urls[i], self._ready_infos[i], self._ready_keys[i]
                    if entry is None or entry.error is not None:  # a pending file's old version
                        self.resolver.known.pop(old.info.path, None)  # tells it is being rewritten
            if entry is not None:
                self._entries[url] = entry
                if entry.info is not None:
                    i = bisect.bisect_left(self._ready_urls, url)
                    self._ready_urls.insert(i, url)
                    self._ready_infos.insert(i, entry.info)
                    self._ready_keys.insert(i, shard_key(entry.info))
                    self.resolver.known[entry.info.path] = entry.info
                elif entry.error is not None:
                    self._rejected.add(url)
                else:
                    self._pending.add(url)
            if old is not None or entry is not None:
                self.version += 1
                self._cond.notify_all()

    # reading
    def snapshot(self, epoch: int) -> Snapshot:
        """The snapshot for ``epoch``, as ``Resolver.resolve`` would make it now; see the class doc."""
        self.start()
        if self.closed:
            raise RuntimeError(f"index of {self.source.describe()} is closed")
        if self.polling:
            self.rescan()
        elif self._root_replaced():  # e.g. a symlink to the data swapped for a new version
            self.rescan()
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
            pending = tuple(sorted(self._pending))
            rejected = [(u, self._entries[u].error) for u in sorted(self._rejected)]
        for _url, exn in rejected:
            self.resolver.reject(exn)
        if not shards and not pending and not rejected:
            raise NoShardsError(f"{self.source.describe()} matches no shard ({', '.join(SHARD_PATTERNS)})")
        return Snapshot(epoch, shards, sid, tuple((u, str(e)) for u, e in rejected), pending, time.time())

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


def _background(ref: weakref.ref, state: _IndexState) -> None:
    """Indexes changed files as events arrive; rescans periodically (every poll interval when polling)."""
    while True:
        index = ref()
        if index is None or state.closed:
            return
        try:
            index.pump()
            with state.cond:
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
        if rescan or busy:
            del index
            continue
        del index  # hold no reference while idle, so the index can be collected
        if state.closed:
            return
        fds = [state.wake_r] + ([state.inotify.fd] if state.inotify is not None and state.inotify.fd >= 0 else [])
        try:
            ready, _, _ = select.select(fds, [], [], max(0.0, min(wait, 5.0)))
        except (OSError, ValueError):  # the inotify fd was just replaced (or closed)
            continue
        if state.wake_r in ready:
            try:
                os.read(state.wake_r, 512)
            except OSError:
                pass


def resolve_waiting(
    resolve_once: Callable[[], Snapshot],
    *,
    describe: str,
    min_shards: int,
    timeout: float | None,
    index: DirectoryIndex | None = None,
    poll: float = DEFAULT_POLL,
) -> Snapshot:
    """``resolve_once()``, repeated until its snapshot lists ``min_shards`` ready shards.

    Between attempts it sleeps until the index reports a change (or ``poll`` seconds pass,
    without an index). Raises NotEnoughShardsError after ``timeout`` seconds (None: never),
    naming what was found: ready, pending and rejected shards. With ``min_shards <= 0`` it
    resolves once, and a source with no shard at all raises NoShardsError as usual.
    """
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
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
