"""The state directory: how one snapshot per epoch reaches every DataLoader worker.

DataLoader copies the dataset into each worker (once for persistent workers, at every
``iter(loader)`` otherwise), so nothing set on the main process's object later reaches a
persistent worker. What every consumer shares instead is a small directory, created by the
main process when the dataset is built, before any worker starts:

- ``control.json``: the epoch last set by ``set_epoch``, a generation counter, rank and world size.
- ``snapshot-<epoch>.pkl``: the published snapshot of each epoch, written once (under a lock,
  temporary name then rename) and only read afterwards. Its shards are in a
  ``columns-<pid>-<n>.pkl`` file of packed columns (``snapshot_columns``) that epochs with an
  unchanged snapshot share, so publishing one costs a small file; a consumer builds only the
  shards it reads, so its epoch starts in milliseconds.
- ``counter-<num_workers>-<worker>.json``: how many epochs this worker slot has iterated
  since the last ``set_epoch``, so iteration without ``set_epoch`` advances the epoch in
  every kind of worker (a DataLoader worker calls ``iter(dataset)`` once per epoch).
- ``stats-<epoch>-<rank>-<worker>.json``: what each consumer read, for ``stats()``.
- ``resume.json``: which loaded checkpoint last restarted the epoch counters.

Under torch.distributed, ``set_epoch`` runs in each rank's main process: rank 0 resolves the
snapshot and broadcasts it, and every rank publishes the same snapshot into its own state
directory. Workers never list the shard directory on their own when a snapshot is published.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from ..core import columns as snapshot_columns
from ..format.atomic import unlink_quietly, write_atomic
from ..core.snapshot import Snapshot

KEEP_SNAPSHOTS = 4


def _read_json(path: str, default: dict) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return default



_PREFIX = "wdsrefresh-"
_OWNER = ".owner"  # locked (flock) by the process that made the directory, for as long as it lives


def _hold_owner_lock(directory: str) -> int:
    """Locks the directory's owner file and returns its descriptor (kept open: the lock ends
    with the process, SIGKILL included). The file is locked before it gets its name, so a
    sweep never finds it unlocked while its owner lives."""
    pending = os.path.join(directory, _OWNER + ".pending")
    fd = os.open(pending, os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(pending, os.path.join(directory, _OWNER))
    return fd


def _remove_dead(parent: str) -> None:
    """Removes the state directories in ``parent`` whose owner process is gone (a process
    killed with SIGKILL never runs its cleanup). Gone means nobody holds the owner file's lock:
    a test that holds across pid namespaces and, through NFS's lock manager, across hosts; a
    directory without an owner file (made by an older version, or being made) is left alone."""
    for name in os.listdir(parent):
        owner = os.path.join(parent, name, _OWNER)
        if not name.startswith(_PREFIX):
            continue
        try:
            fd = os.open(owner, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its owner lives
        finally:
            os.close(fd)  # (after a successful flock this also drops it: the directory is going)
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


class StateDirectory:
    """The directory shared by the main process and all its DataLoader workers.

    Each dataset gets a fresh private directory (inside ``parent`` when given, e.g. a local
    disk), removed when the dataset is collected: a directory left by an earlier job or shared
    with another rank would hand out its snapshots and epoch counters. Its owner holds a lock
    on a file in it for as long as it lives, so the directory of a process killed with SIGKILL
    is removed by the next dataset made in the same parent.
    """

    def __init__(self, parent: str | None = None):
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        parent = parent if parent is not None else tempfile.gettempdir()
        _remove_dead(parent)
        self.directory = tempfile.mkdtemp(prefix=_PREFIX, dir=parent)
        self._owner_fd: int | None = _hold_owner_lock(self.directory)
        self.owner_pid = os.getpid()
        self._recent: dict[int, tuple[int, Snapshot]] = {}  # epoch -> (file inode, snapshot) seen here
        # the shards last published here and their columns file: an unchanged snapshot reuses it
        self._columns: tuple[Sequence, str] | None = None
        self._files_written = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_recent": {}, "_columns": None, "_files_written": 0, "_owner_fd": None}

    def cleanup(self) -> None:
        if os.getpid() == self.owner_pid:
            shutil.rmtree(self.directory, ignore_errors=True)
            fd, self._owner_fd = self._owner_fd, None
            if fd is not None:
                os.close(fd)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def write_json(self, name: str, doc: dict) -> None:
        write_atomic(self.path(name), json.dumps(doc).encode())

    def read_json(self, name: str, default: dict) -> dict:
        return _read_json(self.path(name), default)

    # control: written by the main process
    def control(self) -> dict:
        return self.read_json("control.json", {"epoch": 0, "generation": 0, "rank": 0, "world_size": 1})

    def set_control(self, epoch: int, rank: int, world_size: int, bump: bool = True) -> None:
        generation = self.control()["generation"] + (1 if bump else 0)
        self.write_json("control.json", {"epoch": epoch, "generation": generation, "rank": rank,
                                         "world_size": world_size})

    def next_epoch_for(self, worker: int, num_workers: int) -> tuple[int, dict]:
        """The epoch worker slot ``worker`` iterates now, and advances its counter."""
        control = self.control()
        name = f"counter-{num_workers}-{worker}.json"
        mine = self.read_json(name, {"generation": -1, "iterations": 0})
        iterations = mine["iterations"] + 1 if mine["generation"] == control["generation"] else 0
        self.write_json(name, {"generation": control["generation"], "iterations": iterations})
        return control["epoch"] + iterations, control

    def last_num_workers(self) -> int | None:
        """How many DataLoader workers the last loader over this dataset had (1 for none), as
        its workers' epoch counters tell; None before any iteration."""
        counters = []
        for name in os.listdir(self.directory):
            if name.startswith("counter-") and name.endswith(".json"):
                try:
                    counters.append((os.stat(self.path(name)).st_mtime_ns, int(name.split("-")[1])))
                except (OSError, ValueError, IndexError):
                    continue
        return max(counters)[1] if counters else None

    def restart_at(self, epoch: int, token: str, force: bool) -> int:
        """Makes ``epoch`` the one every consumer iterates next, once per loaded checkpoint
        ``token`` (unless ``force``); returns the control generation. Call under ``lock()``.

        Every DataLoader worker loads its share of one checkpoint: the first one sets the epoch
        (restarting every worker's epoch counter), the others find it done and leave the counters.
        """
        control = self.control()
        mark = self.read_json("resume.json", {})
        if (not force and mark.get("token") == token and mark.get("generation") == control["generation"]
                and control["epoch"] == epoch):
            return control["generation"]
        self.set_control(epoch, control["rank"], control["world_size"], bump=True)
        generation = self.control()["generation"]
        self.write_json("resume.json", {"token": token, "generation": generation})
        return generation

    # snapshots: published once per epoch
    def _snapshot_path(self, epoch: int) -> str:
        return self.path(f"snapshot-{epoch:09d}.pkl")

    def load(self, epoch: int) -> Snapshot | None:
        try:
            with open(self._snapshot_path(epoch), "rb") as f:
                inode = os.fstat(f.fileno()).st_ino  # a re-published epoch is a new file
                cached = self._recent.get(epoch)
                if cached is not None and cached[0] == inode:
                    return cached[1]
                snapshot = self._from_published(pickle.load(f))
        except FileNotFoundError:
            return None
        self._remember(inode, snapshot)
        return snapshot

    def _remember(self, inode: int, snapshot: Snapshot) -> None:
        self._recent[snapshot.epoch] = (inode, snapshot)
        for epoch in sorted(self._recent)[:-2]:
            del self._recent[epoch]

    def latest(self, before: int | None = None) -> Snapshot | None:
        for epoch in sorted(self._published_epochs(), reverse=True):
            if before is None or epoch < before:
                snap = self.load(epoch)
                if snap is not None:
                    return snap
        return None

    def published_epochs(self) -> list[int]:
        """The epochs whose snapshot is published here (the latest ``KEEP_SNAPSHOTS`` or so)."""
        return self._published_epochs() if os.path.isdir(self.directory) else []

    def _published_epochs(self) -> list[int]:
        return [
            int(name[len("snapshot-") : -len(".pkl")])
            for name in os.listdir(self.directory)
            if name.startswith("snapshot-") and name.endswith(".pkl")
        ]

    def publish(self, snapshot: Snapshot) -> None:
        path = self._snapshot_path(snapshot.epoch)
        write_atomic(path, pickle.dumps(self._published(snapshot), protocol=pickle.HIGHEST_PROTOCOL))
        self._remember(os.stat(path).st_ino, snapshot)
        for epoch in sorted(self._published_epochs())[:-KEEP_SNAPSHOTS]:
            if epoch < snapshot.epoch:
                self._forget(epoch)

    def _published(self, snapshot: Snapshot) -> dict:
        """What ``publish`` writes: the name of the shards' columns file (written when they
        changed since the last publish here) and the rest of the snapshot."""
        if self._columns is None or not (self._columns[0] is snapshot.shards or (
                len(self._columns[0]) == len(snapshot.shards) and self._columns[0] == snapshot.shards)):
            self._files_written += 1
            name = f"columns-{os.getpid()}-{self._files_written}.pkl"
            columns = getattr(snapshot.shards, "doc", None) or snapshot_columns.encode(snapshot)
            if "ends" not in columns:
                columns = snapshot_columns.with_offsets(columns)
            write_atomic(self.path(name), pickle.dumps(columns, protocol=pickle.HIGHEST_PROTOCOL))
            self._columns = (snapshot.shards, name)
        return {"columns": self._columns[1], "epoch": snapshot.epoch, "id": snapshot.id,
                "rejected": snapshot.rejected, "pending": snapshot.pending, "resolved_at": snapshot.resolved_at,
                "resolve_seconds": snapshot.resolve_seconds, "pending_reasons": snapshot.pending_reasons}

    def _from_published(self, doc: dict) -> Snapshot:
        with open(self.path(doc["columns"]), "rb") as f:
            columns = pickle.load(f)
        table = snapshot_columns.decode_lazy({**columns, "epoch": doc["epoch"]})
        return Snapshot(doc["epoch"], table.shards, table.id, doc["rejected"], doc["pending"], doc["resolved_at"],
                        doc["resolve_seconds"], doc.get("pending_reasons", {}))

    def _forget(self, epoch: int) -> None:
        """Removes an old epoch's snapshot, consumer stats and the columns files no kept epoch
        uses, so long runs do not pile up files."""
        stats_prefix = f"stats-{epoch:09d}-"
        names = [n for n in os.listdir(self.directory) if n.startswith(stats_prefix)]
        for path in [self._snapshot_path(epoch)] + [self.path(n) for n in names]:
            unlink_quietly(path)
        used = {self._columns_file(e) for e in self._published_epochs()}
        if self._columns is not None:
            used.add(self._columns[1])
        for name in os.listdir(self.directory):
            if name.startswith("columns-") and name not in used:
                unlink_quietly(self.path(name))

    def _columns_file(self, epoch: int) -> str | None:
        try:
            with open(self._snapshot_path(epoch), "rb") as f:
                return pickle.load(f)["columns"]
        except FileNotFoundError:
            return None

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
        with open(self.path("lock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # stats: written by each consumer at the end of its epoch
    def write_stats(self, epoch: int, rank: int, worker: int, stats: dict) -> None:
        """Records a consumer's counters; a no-op once the dataset (and its directory) is gone."""
        if os.path.isdir(self.directory):
            self.write_json(f"stats-{epoch:09d}-{rank}-{worker}.json", stats)

    def read_stats(self, epoch: int) -> list[dict]:
        prefix = f"stats-{epoch:09d}-"
        names = sorted(n for n in os.listdir(self.directory) if n.startswith(prefix) and n.endswith(".json"))
        return [self.read_json(n, {}) for n in names]
