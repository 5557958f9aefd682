"""Linux inotify, read directly through ctypes: a non-blocking queue of directory events.

Read directly rather than through a watchdog observer: watchdog hands each event through
threads before a handler sees it, so a resolve could never tell whether it has seen every
event queued before it began. Reading the inotify fd without blocking lets a snapshot drain
the kernel queue itself: a shard renamed into the directory before ``set_epoch`` is called is
in that epoch's snapshot, always.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from dataclasses import dataclass

from . import forksafe

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ONLYDIR, IN_ISDIR = 0x01000000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, getattr(os, "O_CLOEXEC", 0o2000000)
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")
_KINDS = ((IN_MODIFY, "modified"), (IN_CLOSE_WRITE, "closed"), (IN_CREATE, "created"), (IN_DELETE, "deleted"),
          (IN_MOVED_FROM, "moved_from"), (IN_MOVED_TO, "moved_to"), (IN_ATTRIB, "attrib"))

@dataclass(frozen=True)
class Change:
    """One file event. ``path`` None means only a full rescan can tell what changed
    (``kind`` "overflow": events were lost; "directory": a directory appeared, went or moved)."""

    path: str | None
    kind: str

    @property
    def settled(self) -> bool:
        """A change after which the file is worth indexing (not a write still under way)."""
        return self.kind != "modified"


def _libc():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return libc, ctypes


class Inotify:
    """A non-blocking inotify instance on some directories (Linux); raises OSError if unavailable."""

    name = "inotify"
    rescan_at_snapshot = False  # the kernel queue is drained synchronously

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
        forksafe.track(self)

    def fileno(self) -> int:
        return self.fd

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
                    change = self._change(wd, mask, name)
                    if change is not None:
                        out.append(change)

    def _change(self, wd: int, mask: int, name: bytes) -> Change | None:
        directory = self.dirs.get(wd)
        if mask & IN_Q_OVERFLOW:
            return Change(None, "overflow")
        if mask & IN_IGNORED:
            self.dirs.pop(wd, None)
            return None
        if directory is None:
            return None
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF) or (mask & IN_ISDIR and name):
            return Change(None, "directory")
        if not name:
            return None
        kind = next((k for bit, k in _KINDS if mask & bit), "attrib")
        return Change(os.path.join(directory, os.fsdecode(name)), kind)

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0 and os.getpid() == self.pid:
            os.close(fd)
        forksafe.untrack(self)

    def drop_in_child(self) -> None:
        fd, self.fd = self.fd, -1
        forksafe.close_quietly(fd)
        self._lock = threading.Lock()
