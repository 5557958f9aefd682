"""Keeping freed memory for reuse while a reader holds large payloads until their block checks out.

A reader checking 4 MiB block digests holds the payloads it read from a block until the
block's digest matched (no byte is yielded unchecked). With 256 KiB payloads that is 16 live
buffers, freed together once the consumer is done with them. Unless the process happened to
allocate a larger buffer before, glibc's malloc then gives that memory back to the system
(its trim threshold follows its mmap threshold, 2 x 256 KiB), and the next block's payloads
land on fresh pages the kernel must fault in and zero: ``tools/bench_hold.py`` measured
reading, hashing and holding 256 KiB payloads at 4.6x the time of reading them alone that
way, and 1.3x with the thresholds below. Raising them once per process keeps those pages for
the next block. It changes the process's malloc (up to ``TRIM_THRESHOLD`` of freed memory is
kept instead of returned), so it is done only when a reader is about to hold a large payload,
only on glibc, and never when the user set ``MALLOC_TRIM_THRESHOLD_`` or
``MALLOC_MMAP_THRESHOLD_`` (their choice stands).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

MMAP_THRESHOLD = 32 << 20  # glibc's largest: allocations below come from the heap, reusable
TRIM_THRESHOLD = 64 << 20  # freed memory at the top of the heap kept for reuse, up to this
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")

_done_in: int | None = None  # the pid that set them (a forked child inherits the settings)


def keep_freed_memory() -> bool:
    """Makes glibc keep freed heap memory for reuse (once per process); whether it is in effect."""
    global _done_in
    if _done_in is not None:
        return _done_in > 0
    _done_in = -1
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(v in os.environ for v in _ENV):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        _done_in = os.getpid()
    return _done_in > 0
