"""Shared-memory segments a DataLoader worker fills again once the main process let go of them.

A fresh shared-memory segment per batch costs its pages: 16 MiB allocated and filled takes
22 ms, against 2.7 ms for the same copy into memory already faulted in. Here each worker keeps a
few segments (Linux ``memfd``s, so nothing is left behind when a process dies) and hands one out
for each large payload blob; the main process maps a segment once, through
``/proc/<worker>/fd/<fd>``, and keeps the mapping for the segment's next uses.

Reuse is safe by construction: the worker writes a segment again only after the main process
said it released that use of it, and the main process says so only when nothing of it is left:
for bytes copied out at arrival, right after the copy; for a tensor viewing the segment, from a
finalizer on the array under that tensor, which every view, slice, memoryview and numpy array
made from it keeps alive (a list of held batches, the pin-memory thread, prefetch). Each
segment's first page is its header: a token naming it, the number of the use the worker handed
out (written by the worker only) and the number of the last use released (written by the main
process only), both through ``pwrite``/``pread`` on the file, so neither side depends on how
its stores to a mapping are ordered.

Where any of this is missing (no ``memfd_create``, no ``/proc``), ``available()`` says so and
callers send their bytes through the pipe as before.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import WdsRefreshError

HEADER = mmap.PAGESIZE  # the data starts on the second page
_MAGIC = b"wdsrseg1"
_LAYOUT = struct.Struct("<8s16sQQ")  # magic, token, handed out, released
_HANDED = 24  # byte offsets of the two counters in the header
_RELEASED = 32
LARGE = 512 << 10  # blobs from this size on cross in a segment; smaller ones through the pipe
GRAIN = 1 << 20  # segment sizes are rounded up to this
KEEP = 6  # segments a worker keeps for reuse; more are made while the main process holds them all
ATTACHED = 64  # mappings the main process keeps for segments' next uses


@dataclass(frozen=True)
class Ref:
    """What crosses the pipe for one use of a segment (and the tokens of segments the worker closed
    since its last ``Ref``, whose mappings the main process can drop)."""

    pid: int
    fd: int
    token: bytes
    use: int
    nbytes: int
    retired: tuple[bytes, ...] = ()


class AttachError(WdsRefreshError, RuntimeError):
    """The main process could not map a DataLoader worker's batch segment."""


def available() -> bool:
    """Whether this platform has what segments need (else bytes go through the pipe)."""
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


# ----------------------------------------------------------------------------------- worker side


class Segment:
    """One memfd and this process's mapping of it."""

    def __init__(self, size: int):
        self.size = size
        self.token = secrets.token_bytes(16)
        self.fd = os.memfd_create("wdsrefresh-batch", getattr(os, "MFD_CLOEXEC", 0))
        os.ftruncate(self.fd, HEADER + size)
        self.map = mmap.mmap(self.fd, HEADER + size)
        self.use = 0
        self.views: list[weakref.ref] = []  # this process's objects over the data of the current use
        os.pwrite(self.fd, _LAYOUT.pack(_MAGIC, self.token, 0, 0), 0)

    def free(self) -> bool:
        """The main process released the last use handed out, and nothing here views it."""
        if any(ref() is not None for ref in self.views):
            return False
        released, = struct.unpack("<Q", os.pread(self.fd, 8, _RELEASED))
        return released == self.use

    def hand_out(self) -> int:
        self.use += 1
        self.views = []
        os.pwrite(self.fd, struct.pack("<Q", self.use), _HANDED)
        return self.use


    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # something of this process still views it: the mapping goes with it
            pass
        os.close(self.fd)


class Pool:
    """This process's segments."""

    def __init__(self):
        self.pid = os.getpid()
        self.segments: list[Segment] = []
        self.retired: list[bytes] = []  # tokens of segments closed since the last ref
        self.lock = threading.Lock()  # refs are made by the queue's feeder thread too

    def take(self, nbytes: int) -> Segment:
        """A segment of at least ``nbytes`` that nobody uses, handed out for a new use. Free
        segments beyond ``KEEP`` (after a burst of held batches, or too small) are closed."""
        free = [s for s in self.segments if s.free()]
        fits = [s for s in free if s.size >= nbytes]
        segment = min(fits, key=lambda s: s.size) if fits else None
        spare = sorted((s for s in free if s is not segment), key=lambda s: s.size)
        while spare and len(self.segments) >= KEEP + (segment is not None):
            self._close(spare.pop(0))
        if segment is None:
            segment = Segment(-(-nbytes // GRAIN) * GRAIN)
            self.segments.append(segment)
        segment.hand_out()
        return segment

    def _close(self, segment: Segment) -> None:
        self.segments.remove(segment)
        with self.lock:
            self.retired.append(segment.token)
        segment.close()

    def ref(self, segment: Segment, nbytes: int) -> Ref:
        """The ``Ref`` of ``segment``'s current use, for ``nbytes`` of data."""
        with self.lock:
            retired, self.retired = tuple(self.retired), []
        return Ref(self.pid, segment.fd, segment.token, segment.use, nbytes, retired)


_pool: Pool | None = None


def pool() -> Pool:
    """This process's pool (a forked child starts its own)."""
    global _pool
    if _pool is None or _pool.pid != os.getpid():
        _pool = Pool()
    return _pool


# ------------------------------------------------------------------------------------ main side


class Attached:
    """The main process's mapping of a worker's segment, and the file it reports releases through.
    Kept alive by the cache and by every finalizer of a use not yet released."""

    def __init__(self, ref: Ref):
        try:
            self.fd = os.open(f"/proc/{ref.pid}/fd/{ref.fd}", os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise AttachError(f"cannot open DataLoader worker {ref.pid}'s batch segment (fd {ref.fd}): {e}") from e
        try:
            header = os.pread(self.fd, _LAYOUT.size, 0)
            magic, token = header[:8], header[8:24]
            if len(header) < _LAYOUT.size or magic != _MAGIC or token != ref.token:
                raise AttachError(f"DataLoader worker {ref.pid}'s fd {ref.fd} is not the batch segment it sent "
                                  f"(header {magic!r}); the worker may have exited")
            self.map = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self.pid = ref.pid

    def release(self, use: int) -> None:
        os.pwrite(self.fd, struct.pack("<Q", use), _RELEASED)

    def __del__(self):
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)


_attached: OrderedDict[bytes, Attached] = OrderedDict()
_lock = threading.Lock()  # arrivals are unpickled by the loader's thread or its pin-memory thread


def attach(ref: Ref) -> Attached:
    """The main process's mapping of the segment ``ref`` names (made on its first use)."""
    with _lock:
        for token in ref.retired:
            _attached.pop(token, None)
        found = _attached.get(ref.token)
        if found is not None:
            _attached.move_to_end(ref.token)
            return found
        _forget_exited(ref.pid)
        found = _attached[ref.token] = Attached(ref)
        if len(_attached) > ATTACHED:
            _attached.popitem(last=False)  # dropped here; it lives on while a use holds it
        return found


def _forget_exited(current: int) -> None:
    """Drops the mappings of workers that exited (a loader without persistent workers starts new
    ones every epoch); a use still held keeps its own."""
    for pid in {a.pid for a in _attached.values()} - {current}:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or someone else's process now
            for token in [t for t, a in _attached.items() if a.pid == pid]:
                del _attached[token]


def release_when_gone(obj: object, attached: Attached, use: int) -> None:
    """Reports ``use`` released once ``obj`` (the array every view of the use keeps alive) is gone."""
    weakref.finalize(obj, attached.release, use)
