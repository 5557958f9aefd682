"""Who is reading: a consumer's place among torch.distributed ranks and DataLoader workers.

torch.distributed lives in each rank's main process only; DataLoader workers learn their
rank from what the main process recorded (see statedir.py). ``broadcast_from_rank0`` is
the one collective the read path uses.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import WdsRefreshError


@dataclass(frozen=True)
class Slot:
    """One consumer: DataLoader worker ``worker`` of ``num_workers`` in rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size and 0 <= self.worker < self.num_workers):
            raise ValueError(f"rank {self.rank}/{self.world_size}, worker {self.worker}/{self.num_workers} out of range")

    @property
    def index(self) -> int:
        """This consumer's number among all consumers of the job."""
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        """How many consumers the job has."""
        return self.world_size * self.num_workers


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of torch.distributed in this process, (0, 1) without it."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def current_slot(recorded_rank: int, recorded_world_size: int) -> Slot:
    """This process's slot. Workers cannot call torch.distributed: they pass the rank the main
    process recorded; a main process reading itself (num_workers=0) asks torch.distributed."""
    import torch.utils.data

    rank, world_size = dist_info()
    if world_size == 1:
        rank, world_size = recorded_rank, recorded_world_size
    info = torch.utils.data.get_worker_info()
    if info is None:
        return Slot(rank, world_size)
    return Slot(rank, world_size, info.id, info.num_workers)


def loader_exit_event() -> Any:
    """The event torch's DataLoader sets when it shuts down the worker process this runs in
    (its worker loop's ``done_event``), or None outside a worker or where a torch version no
    longer names it so. A consumer that sleeps until data arrives looks at it: the loader joins
    each worker for 5 s before it terminates it, so a worker that never wakes makes breaking
    out of a stream loop wait 5 s per worker."""
    frame = sys._current_frames().get(threading.main_thread().ident)  # a worker loops in its main thread
    while frame is not None:
        if frame.f_code.co_name == "_worker_loop":
            event = frame.f_locals.get("done_event")
            return event if callable(getattr(event, "is_set", None)) else None
        frame = frame.f_back
    return None


def in_dataloader_worker() -> bool:
    import torch.utils.data

    return torch.utils.data.get_worker_info() is not None


class RankZeroError(WdsRefreshError, RuntimeError):
    """Rank 0 failed to resolve the epoch's snapshot; raised on the other ranks."""


def broadcast_from_rank0(make: Callable[[], object]) -> object:
    """``make()`` on rank 0, its result on every rank (main processes only).

    If ``make()`` raises on rank 0, every rank raises (rank 0 the original error, the others a
    RankZeroError with its text) instead of waiting for a broadcast that never comes.
    """
    import torch.distributed as dist

    failure: BaseException | None = None
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, make())]
        except Exception as exn:  # noqa: BLE001 - every rank must hear of any failure
            failure = exn
            box = [(False, f"{type(exn).__name__}: {exn}")]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if failure is not None:
        raise failure
    if not ok:
        raise RankZeroError(f"rank 0 could not resolve the snapshot: {value}")
    return value
