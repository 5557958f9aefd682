"""Watching directories for file events: one interface, three ways.

- ``inotify`` (Linux): the kernel queue, drained synchronously (inotify.py). A snapshot that
  drains it sees every event queued before it, so it needs no rescan.
- ``watchdog``: watchdog's native observer (FSEvents on macOS, ReadDirectoryChangesW on
  Windows, inotify on Linux), for platforms without inotify and for recursive watches.
  Events pass through its threads, so a snapshot also rescans (``rescan_at_snapshot``).
- polling: no watcher at all (``watch_or_poll`` returns None and the reason): on network
  file systems, whose changes made by other hosts no event reports, or when asked.

A watcher has ``fileno()`` (readable when events are queued, for ``select``), ``read()``
(the queued events, never blocking), ``add(directory)`` and ``close()``. Watchers belong to
the process that made them: never started at import, never used in a forked child.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from . import forksafe
from .inotify import Change, Inotify

log = logging.getLogger("wdsrefresh")

WATCHERS = ("inotify", "watchdog")
# File systems whose changes made by other hosts no file event reports.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "afs", "ceph", "glusterfs", "lustre",
    "gpfs", "beegfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.glusterfs",
    "fuse.cephfs", "fuse.rclone", "fuse.mountpoint-s3", "fuse.goofys", "wekafs",
})

class Watcher(Protocol):
    name: str
    rescan_at_snapshot: bool

    def fileno(self) -> int: ...
    def add(self, directory: str) -> None: ...
    def read(self) -> list[Change]: ...
    def close(self) -> None: ...


def poll_interval(poll: bool | float, default: float) -> float:
    """Seconds between polls for a ``poll=`` option: True means ``default``."""
    return default if poll is True or not poll else float(poll)


def network_fs_reason(path: str) -> str | None:
    """Why file events cannot be trusted for ``path`` (a network file system), or None."""
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
        return f"{path!r} is on a {fstype} file system, whose remote changes file events do not report"
    return None


def new_watcher(backend: str | Callable[[], Watcher] = "auto", recursive: bool = False) -> Watcher:
    """A watcher of the given backend ("auto": inotify where the kernel has it, else watchdog),
    or made by ``backend`` when it is a callable."""
    if callable(backend):
        return backend()
    if backend not in ("auto", *WATCHERS):
        raise ValueError(f"watch backend {backend!r}: expected one of {('auto', *WATCHERS)}")
    if backend == "inotify" or (backend == "auto" and sys.platform.startswith("linux") and not recursive):
        return Inotify()
    return WatchdogWatcher(recursive=recursive)


def watch_or_poll(root: str, *, poll: bool | float, backend: str | Callable[[], Watcher] = "auto", what: str) -> tuple[Watcher | None, str | None]:
    """A watcher on ``root``, or None and why polling is used instead (logged as a warning).

    ``poll`` forces polling; network file systems poll too; so does a watcher that cannot start.
    """
    if poll:
        return None, "asked for (poll=...)"
    reason = network_fs_reason(root)
    if reason is None:
        watcher = None
        try:
            watcher = new_watcher(backend)
            watcher.add(root)
            return watcher, None
        except OSError as exn:
            if watcher is not None:
                watcher.close()
            reason = f"file events are unavailable ({exn})"
    log.warning("%s: polling instead of watching: %s", what, reason)
    return None, reason


class _StopRace(logging.Filter):
    """Drops the ERROR watchdog's inotify emitter logs when it is stopped while reading events
    (its thread still runs once after stop() released the inotify handle): nothing is wrong,
    and a quiet command would print it at random."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


class WatchdogWatcher:
    """watchdog's native observer behind the Watcher interface: events queue up, a pipe wakes."""

    name = "watchdog"
    rescan_at_snapshot = True  # an event may still be inside watchdog's threads

    def __init__(self, recursive: bool = False):
        from watchdog.observers import Observer

        emitter_log = logging.getLogger("watchdog.observers.inotify")
        if not any(isinstance(f, _StopRace) for f in emitter_log.filters):
            emitter_log.addFilter(_StopRace())
        self.recursive = recursive
        self.pid = os.getpid()
        self._observer = Observer()
        self._queue: deque[Change] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._started = False
        self._lock = threading.Lock()
        forksafe.track(self)

    def fileno(self) -> int:
        return self._wake_r

    def add(self, directory: str) -> None:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"cannot watch {directory!r}: no such directory")
        self._observer.schedule(_Forward(self), directory, recursive=self.recursive)
        if not self._started:
            self._observer.start()
            self._started = True

    def push(self, change: Change) -> None:
        self._queue.append(change)
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def read(self) -> list[Change]:
        with self._lock:
            if self._wake_r < 0:
                return []
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        out = []
        while self._queue:
            out.append(self._queue.popleft())
        return out

    def close(self) -> None:
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        if os.getpid() != self.pid or fds[0] < 0:
            return
        if self._started:
            self._observer.stop()
            self._observer.join()
        for fd in fds:
            os.close(fd)
        forksafe.untrack(self)

    def drop_in_child(self) -> None:
        """The observer's threads are gone in a forked child; drop the pipe."""
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            forksafe.close_quietly(fd)
        self._lock = threading.Lock()


class _Forward:
    """A watchdog event handler that turns events into Changes for its watcher."""

    _SKIP = ("opened", "closed_no_write")

    def __init__(self, watcher: WatchdogWatcher):
        self.watcher = watcher

    def dispatch(self, event) -> None:
        kind = event.event_type
        if kind in self._SKIP:
            return
        if event.is_directory:
            if kind != "modified":  # a directory's own mtime changes with every file in it
                self.watcher.push(Change(None, "directory"))
            return
        if kind == "moved":
            self.watcher.push(Change(os.fsdecode(event.src_path), "moved_from"))
            self.watcher.push(Change(os.fsdecode(event.dest_path), "moved_to"))
        else:
            self.watcher.push(Change(os.fsdecode(event.src_path), kind))
