"""How one snapshot per epoch reaches every DataLoader worker and every rank.

DataLoader copies the dataset into each worker (once for persistent workers, at every
``iter(loader)`` otherwise), so nothing set on the main process's object later reaches a
persistent worker. What every consumer shares instead is a small *state directory*, created
by the main process when the dataset is built, before any worker starts:

- ``control.json``: the epoch last set by ``set_epoch``, a generation counter, rank and world size.
- ``snapshot-<epoch>.pkl``: the published snapshot of each epoch, written once (under a lock,
  temporary name then rename) and only read afterwards.
- ``consumer-<num_workers>-<worker>.json``: how many epochs this worker slot has iterated
  since the last ``set_epoch``, so iteration without ``set_epoch`` advances the epoch in
  every kind of worker (a DataLoader worker calls ``iter(dataset)`` once per epoch).
- ``stats-<epoch>-<worker>.json``: what each consumer read, for ``stats()``.

Under torch.distributed, ``set_epoch`` runs in each rank's main process: rank 0 resolves the
snapshot and broadcasts it, and every rank publishes the same snapshot into its own state
directory. Workers never list the directory on their own when a snapshot is published.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .snapshot import Snapshot

log = logging.getLogger("wdsrefresh")

KEEP_SNAPSHOTS = 4


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of torch.distributed in this process, (0, 1) without it."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RankZeroError(RuntimeError):
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


def write_atomic(path: str, data: bytes) -> None:
    """Readers of ``path`` see the old or the new bytes, never a part (no fsync: state is per run)."""
    fd, tmp = tempfile.mkstemp(prefix="_tmp.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_json(path: str, default: dict) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def consumer_slot() -> tuple[int, int]:
    """(worker id, number of workers) of this DataLoader worker; (0, 1) in the main process."""
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def rank_and_world(control: dict) -> tuple[int, int]:
    """This consumer's (rank, world_size): the main process's, as recorded in ``control``.

    Workers cannot call torch.distributed; a main process reading itself (num_workers=0) asks it.
    """
    live_rank, live_world = dist_info()
    if live_world > 1:
        return live_rank, live_world
    return control["rank"], control["world_size"]


class EpochState:
    """The state directory shared by the main process and all its DataLoader workers.

    Each dataset gets a fresh private directory (inside ``parent`` when given, e.g. a local
    disk), removed when the dataset is collected: a directory left by an earlier job or shared
    with another rank would hand out its snapshots and epoch counters.
    """

    def __init__(self, parent: str | None = None):
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        self.directory = tempfile.mkdtemp(prefix="wdsrefresh-", dir=parent)
        self.owner_pid = os.getpid()
        self._recent: dict[int, tuple[int, Snapshot]] = {}  # epoch -> (file inode, snapshot) seen here

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_recent": {}}

    def cleanup(self) -> None:
        if os.getpid() == self.owner_pid:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    # control: written by the main process
    def control(self) -> dict:
        return _read_json(self._path("control.json"), {"epoch": 0, "generation": 0, "rank": 0, "world_size": 1})

    def set_control(self, epoch: int, rank: int, world_size: int, bump: bool = True) -> None:
        current = self.control()
        generation = current["generation"] + (1 if bump else 0)
        doc = {"epoch": epoch, "generation": generation, "rank": rank, "world_size": world_size}
        write_atomic(self._path("control.json"), json.dumps(doc).encode())

    def next_epoch_for(self, worker: int, num_workers: int) -> tuple[int, dict]:
        """The epoch worker slot ``worker`` iterates now, and advances its counter."""
        control = self.control()
        path = self._path(f"consumer-{num_workers}-{worker}.json")
        mine = _read_json(path, {"generation": -1, "iterations": 0})
        iterations = mine["iterations"] + 1 if mine["generation"] == control["generation"] else 0
        write_atomic(path, json.dumps({"generation": control["generation"], "iterations": iterations}).encode())
        return control["epoch"] + iterations, control

    # snapshots: published once per epoch
    def _snapshot_path(self, epoch: int) -> str:
        return self._path(f"snapshot-{epoch:09d}.pkl")

    def load(self, epoch: int) -> Snapshot | None:
        try:
            with open(self._snapshot_path(epoch), "rb") as f:
                inode = os.fstat(f.fileno()).st_ino  # a re-published epoch is a new file
                cached = self._recent.get(epoch)
                if cached is not None and cached[0] == inode:
                    return cached[1]
                snapshot = pickle.load(f)
        except FileNotFoundError:
            return None
        self._remember(inode, snapshot)
        return snapshot

    def _remember(self, inode: int, snapshot: Snapshot) -> None:
        self._recent[snapshot.epoch] = (inode, snapshot)
        for epoch in sorted(self._recent)[:-2]:
            del self._recent[epoch]

    def latest(self, before: int | None = None) -> Snapshot | None:
        epochs = sorted(self._published_epochs(), reverse=True)
        for epoch in epochs:
            if before is None or epoch < before:
                snap = self.load(epoch)
                if snap is not None:
                    return snap
        return None

    def _published_epochs(self) -> list[int]:
        return [
            int(name[len("snapshot-") : -len(".pkl")])
            for name in os.listdir(self.directory)
            if name.startswith("snapshot-") and name.endswith(".pkl")
        ]

    def publish(self, snapshot: Snapshot) -> None:
        path = self._snapshot_path(snapshot.epoch)
        write_atomic(path, pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL))
        self._remember(os.stat(path).st_ino, snapshot)
        for epoch in sorted(self._published_epochs())[:-KEEP_SNAPSHOTS]:
            if epoch < snapshot.epoch:
                self._forget(epoch)

    def _forget(self, epoch: int) -> None:
        """Removes an old epoch's snapshot and consumer stats, so long runs do not pile up files."""
        stats_prefix = f"stats-{epoch:09d}-"
        names = [n for n in os.listdir(self.directory) if n.startswith(stats_prefix)]
        for path in [self._snapshot_path(epoch)] + [self._path(n) for n in names]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def get_or_resolve(self, epoch: int, resolve: Callable[[Snapshot | None], Snapshot]) -> Snapshot:
        """The published snapshot of ``epoch``; the first caller resolves and publishes it."""
        snap = self.load(epoch)
        if snap is not None:
            return snap
        with self.lock():
            snap = self.load(epoch)
            if snap is None:
                snap = resolve(self.latest(before=epoch))
                self.publish(snap)
            return snap

    @contextmanager
    def lock(self) -> Iterator[None]:
        with open(self._path("lock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # stats: written by each consumer at the end of its epoch
    def write_stats(self, epoch: int, rank: int, worker: int, stats: dict) -> None:
        """Records a consumer's counters; a no-op once the dataset (and its directory) is gone."""
        if os.path.isdir(self.directory):
            write_atomic(self._path(f"stats-{epoch:09d}-{rank}-{worker}.json"), json.dumps(stats).encode())

    def read_stats(self, epoch: int) -> list[dict]:
        prefix = f"stats-{epoch:09d}-"
        out = []
        for name in sorted(os.listdir(self.directory)):
            if name.startswith(prefix) and name.endswith(".json"):
                out.append(_read_json(self._path(name), {}))
        return out
