"""Replacing a file atomically: readers see the old bytes or the new ones, never a part."""

from __future__ import annotations

import os
import tempfile


TMP_PREFIX = "_tmp."  # then the writer's pid: a sweep can tell a killed writer's leftover (see dead_temporaries)


def dead_temporaries(directory: str) -> list[str]:
    """Temporary files ``write_atomic`` left in ``directory`` when its process was killed."""
    leftovers = []
    for name in os.listdir(directory):
        pid = name[len(TMP_PREFIX):].split(".", 1)[0]
        if name.startswith(TMP_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            leftovers.append(os.path.join(directory, name))
    return leftovers


def unlink_quietly(path: str) -> None:
    """Removes ``path``; a file already gone is no error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(path: str, data: bytes, *, durable: bool = False) -> None:
    """Writes ``data`` to ``path`` through a temporary name and a rename.

    ``durable`` also fsyncs the file and its directory, so the new bytes survive a power cut
    (manifests, journals); without it only the atomicity holds (state kept for one run).
    The file is readable by other users (0644), like one written with ``open``.
    Errors name ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}.", dir=directory)
    except OSError as exn:
        raise type(exn)(exn.errno, f"cannot write {path}: {exn.strerror}") from None
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from jobs run as other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exn:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exn, OSError) and path not in str(exn):
            raise type(exn)(exn.errno, f"cannot write {path}: {exn.strerror}") from None
        raise
    if durable:
        fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
