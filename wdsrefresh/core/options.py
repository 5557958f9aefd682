"""What a dataset's options say to the read path: the readiness rule's parameters and the
reading policies. Frozen values, shared by every backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..format.tario import MAX_SAMPLE_BYTES

VERIFY_MODES = ("off", "inline", "strict")
CHANGE_POLICIES = ("reload", "skip", "raise")
DEFAULT_SETTLE = 10.0


@dataclass(frozen=True)
class Readiness:
    """The parameters of the rule: whether digests are computed, and the settle time."""

    with_digest: bool = True
    settle: float = DEFAULT_SETTLE
    max_sample_bytes: int = MAX_SAMPLE_BYTES
    index_cache: str | None = None  # the persistent index cache's directory (index_cache.py); None: none


@dataclass(frozen=True)
class ReadOptions:
    verify: str = "inline"
    on_change: str = "reload"
    handler: Callable[[BaseException], bool] | None = None
    equalize: bool = True
    settle: float = DEFAULT_SETTLE
    max_sample_bytes: int = MAX_SAMPLE_BYTES
    index_cache: str | None = None  # the persistent index cache's directory; None: none
    # the object store a shard's URL is read through: its source's ``ShardSource.store_for``,
    # set by each consumer from the source it holds (None: local files only)
    store_for: Callable[[str], Any] | None = field(default=None, compare=False)

    @property
    def readiness(self) -> Readiness:
        return Readiness(with_digest=self.verify != "off", settle=self.settle, max_sample_bytes=self.max_sample_bytes,
                         index_cache=self.index_cache)
