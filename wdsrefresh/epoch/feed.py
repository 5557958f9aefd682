"""The first stage of a RefreshingWebDataset pipeline: what yields the samples, epoch or stream."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from .slot import Slot
from ..core.snapshot import Snapshot
from .statedir import StateDirectory


@dataclass(frozen=True)
class Consumer:
    """One slot (rank, worker) reading one epoch of one snapshot; seeds per-consumer shuffles."""

    slot: Slot
    epoch: int
    snapshot_id: str


class SampleSource(Protocol):
    """What RefreshingWebDataset asks of its first stage (EpochSource, StreamSource).

    Called in the main process: ``set_epoch``, ``close``, ``stats``, ``snapshot``. Called in
    each consumer (a DataLoader worker, or the main process without workers): ``prepare``
    when an iterator is made, then ``__call__`` for the samples; ``state_dict`` and
    ``load_state_dict`` around them. ``current`` is the consumer iterating now.
    """

    seed: int
    current: Consumer | None
    statedir: StateDirectory
    watching: str | None

    def set_epoch(self, epoch: int) -> Snapshot: ...
    def close(self) -> None: ...
    def stats(self, epoch: int | None = None) -> Any: ...
    def snapshot(self, epoch: int | None = None) -> Snapshot | None: ...
    def prepare(self) -> None: ...
    def __call__(self) -> Iterator[dict]: ...
    def last_position(self) -> tuple[int, int] | None: ...
    def shuffle_resume(self) -> tuple[list[tuple[int, int]] | None, tuple | None]: ...
    def state_dict(self, shuffle: dict | None = None, held: list | None = None) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
