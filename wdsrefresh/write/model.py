"""The write side's values: an input sample and its members, and the error of input that cannot
be packed. At the bottom of write/: every module of it may import this one, it imports none."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import WdsRefreshError
from ..format.tarwriter import member_size


class PackError(WdsRefreshError, ValueError):
    """Input that cannot be packed; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Member:
    name: str
    path: str  # the input file ("" for a member made in memory)
    size: int
    mtime_ns: int = 0
    data: bytes | None = None  # the member's bytes, when made in memory (a --label-from-dir label)


@dataclass(frozen=True)
class Sample:
    key: str
    members: tuple[Member, ...]

    @property
    def tar_size(self) -> int:
        return sum(member_size(m.name, m.size) for m in self.members)
