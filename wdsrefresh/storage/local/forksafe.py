"""Watchers hold fds and threads that a forked child must not use: it drops them at fork.

A DataLoader worker forked from a process that watches a directory inherits the fds but
not the threads behind them; reading them there would steal the parent's events.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class DropsInChild(Protocol):
    def drop_in_child(self) -> None:
        """Forgets (closes) the fds inherited from the parent; the object is unusable afterwards."""


_LIVE: weakref.WeakSet = weakref.WeakSet()


def track(obj: DropsInChild) -> None:
    _LIVE.add(obj)


def untrack(obj: DropsInChild) -> None:
    _LIVE.discard(obj)


def close_quietly(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _after_fork_in_child() -> None:
    for obj in list(_LIVE):
        obj.drop_in_child()
    _LIVE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
