"""Whether any process holds a file open for writing, asked of the kernel with a read lease.

On Linux ``fcntl(fd, F_SETLEASE, F_RDLCK)`` succeeds only while no process has the file open
for writing (EAGAIN otherwise), so a complete tar that takes the lease has a writer that is
done with it. The lease is released at once: while it is held, a writer's ``open`` blocks and
the holder is sent a signal (SIGIO by default, which kills), so the break signal is set to
SIGURG, whose default action is to ignore it, before the lease is taken.

A lease needs the file's owner (or CAP_LEASE) and a local file system: elsewhere (NFS, CIFS,
another user's files, macOS, Windows) the answer is None, "cannot tell", and the first time
per directory a WARNING says that readiness falls back to the settle time.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading

log = logging.getLogger("wdsrefresh")

_F_SETLEASE = getattr(fcntl, "F_SETLEASE", None)
_F_SETSIG = getattr(fcntl, "F_SETSIG", None)
_BREAK_SIGNAL = signal.SIGURG  # ignored unless a handler is installed: a lease break never kills
_warned_dirs: set[str] = set()
_warned_lock = threading.Lock()


def open_for_writing(path: str, settle: float) -> bool | None:
    """True while another process has ``path`` open for writing, False when none has, None when
    this system cannot tell (then ``settle`` is the rule, and a WARNING says so once per directory).
    Never holds the lease across anything: a writer's ``open`` waits for microseconds at most."""
    if _F_SETLEASE is None or _F_SETSIG is None:
        return _cannot_tell(path, settle, "file leases are not available on this platform")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # gone or unreadable: the caller's stat or read says why
    try:
        fcntl.fcntl(fd, _F_SETSIG, _BREAK_SIGNAL)
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exn:
        if exn.errno == errno.EAGAIN:
            return True
        return _cannot_tell(path, settle, os.strerror(exn.errno) if exn.errno else str(exn))
    else:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def _cannot_tell(path: str, settle: float, why: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    with _warned_lock:
        first = directory not in _warned_dirs
        _warned_dirs.add(directory)
    if first:
        log.warning("%s: cannot tell whether a writer still holds files open here (no read lease: %s); "
                    "readiness of files written in place falls back to %g s without a write here: "
                    "publish by rename", directory, why, settle)
    return None
