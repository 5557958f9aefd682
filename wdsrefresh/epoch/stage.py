"""What every epoch-mode first stage does alike, whatever it reads (one source or a mix).

In the main process: ``set_epoch`` resolves the epoch's snapshot (rank 0 under
torch.distributed, broadcast to the others) and publishes it in the state directory. In each
consumer: ``prepare`` / ``__call__`` take the next epoch of this worker slot (a loaded
checkpoint's first), load its published snapshot and read this consumer's share. Checkpoints:
``load_state_dict`` publishes the saved snapshot as its epoch's and makes that epoch the next
one every consumer iterates. Subclasses say how to resolve (``_resolve``), what a consumer's
iteration is (``_fresh_iteration``, ``_resumed_iteration``), how to read it (``_samples``) and
how to parse a state (``_merge``, ``_parse``, ``_saved_snapshot``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from .feed import Consumer
from .slot import Slot, broadcast_from_rank0, current_slot, dist_info, in_dataloader_worker
from .statedir import StateDirectory

log = logging.getLogger("wdsrefresh")

SNAPSHOT_WAIT_SECONDS = 120.0  # how long a worker's load waits for worker 0 to publish the saved snapshot


@dataclass(frozen=True)
class LoadedState:
    """A checkpoint loaded into this consumer, waiting for the iteration that resumes it;
    ``resume`` is the parsed state (its ``epoch`` and ``token``)."""

    resume: Any
    generation: int
    state: dict


class EpochStage:
    """The lifecycle an epoch-mode first stage shares; see the module docstring. Iterations
    have ``consumer`` and ``snapshot``; parsed states ``epoch``, ``token``, ``world_size``, ``num_workers``."""

    _KIND = "snapshot"  # what the log calls what it resumes

    def _init_stage(self, statedir: StateDirectory) -> None:
        self.statedir = statedir
        rank, world_size = dist_info()
        self.statedir.set_control(0, rank, world_size, bump=False)
        self.current: Consumer | None = None
        self._next = None  # the iteration prepared when an iterator is made
        self._live = None  # the iteration running
        self._loaded: LoadedState | None = None
        self._resumed = None  # the last state loaded here, for the epoch's length
        self._loads = 0

    # resolving, in the main process
    def set_epoch(self, epoch: int):
        if self._resumed is not None and self._resumed.epoch != epoch:
            self._resumed = None  # another epoch: the loaded state no longer says what remains
        if self._loaded is not None and self._loaded.resume.epoch == epoch:
            return self._publish_resumed(self._loaded.resume, self._loaded.state, force=True)
        rank, world_size = dist_info()
        previous = self.statedir.latest(before=epoch)
        if world_size > 1:
            snapshot = broadcast_from_rank0(lambda: self._resolve(epoch, previous))
        else:
            snapshot = self._resolve(epoch, previous)
        with self.statedir.lock():
            self.statedir.publish(snapshot)
            self.statedir.set_control(epoch, rank, world_size)
        return snapshot

    def snapshot(self, epoch: int | None = None):
        """The published snapshot of ``epoch`` (default: the latest)."""
        return self.statedir.latest() if epoch is None else self.statedir.load(epoch)

    def stats(self, epoch: int | None = None):
        """This rank's EpochStats of ``epoch`` (default: the latest published epoch); see stats.py."""
        snapshot = self.snapshot(epoch)
        if snapshot is None:
            raise LookupError(f"no snapshot published for epoch {epoch}")
        return self._stats_of(snapshot, self.statedir.latest(before=snapshot.epoch),
                              self.statedir.read_stats(snapshot.epoch), self.statedir.control())

    # iterating, in each consumer
    @property
    def upcoming(self):
        """The snapshot this consumer's prepared iteration reads (None when none is prepared)."""
        return self._next.snapshot if self._next is not None else None

    def prepare(self) -> None:
        """Fixes this consumer's next iteration (epoch, snapshot, share) when its iterator is made."""
        self._next = self._next_iteration()

    def __call__(self):
        it, self._next = self._next, None
        if it is None:
            it = self._next_iteration()
        self._live = it
        self.current = it.consumer
        return self._samples(it)

    def _next_iteration(self):
        control = self.statedir.control()
        slot = current_slot(control["rank"], control["world_size"])
        epoch, control = self.statedir.next_epoch_for(slot.worker, slot.num_workers)
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded.generation == control["generation"] and loaded.resume.epoch == epoch:
            return self._resumed_iteration(loaded.resume, epoch, slot)
        return self._fresh_iteration(epoch, slot, self._snapshot_for(epoch, slot.world_size))

    def _snapshot_for(self, epoch: int, world_size: int):
        snapshot = self.statedir.load(epoch)
        if snapshot is not None:
            return snapshot
        if world_size > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                f"no snapshot published for epoch {epoch}: under torch.distributed call "
                f"ds.set_epoch(epoch) in every rank before each epoch, so all ranks read the same shards"
            )
        return self.statedir.get_or_resolve(epoch, lambda previous: self._resolve(epoch, previous))

    def shuffle_resume(self) -> tuple[list[tuple] | None, tuple | None]:
        """What a resumed .shuffle() buffer takes back: (positions re-read first, rng state)."""
        doc = self._live.shuffle if self._live is not None else None
        if not doc:
            return None, None
        version, internal, gauss = doc["rng"]
        return [tuple(p) for p in doc["buffer"]], (version, tuple(internal), gauss)

    # checkpoint and resume
    def state_dict(self, shuffle: dict | None = None, held: list | None = None) -> dict:
        """This consumer's position in its epoch, as plain values (the format: resume.py, for a mix
        mix/resume.py); ``shuffle`` is the checkpoint of a .shuffle() buffer between this stage and
        the consumer. ``held`` is always empty here: an epoch's .batched() holds nothing when it yields."""
        if self._next is None and self._live is None and self._loaded is not None:
            return self._loaded.state  # loaded and not iterated yet: saved again as it was
        it = self._next or self._live
        return self._state_of(it, shuffle) if it is not None else self._state_before_any_epoch()

    def load_state_dict(self, state: Any) -> None:
        """Makes the next iteration resume the saved epoch where ``state`` left it. ``state`` may
        also hold several consumers' states (a StatefulDataLoader's, or a list of every rank's):
        they are merged, so a different layout resumes without calling ``merge``."""
        if not (isinstance(state, dict) and "format" in state):
            state = self._merge(state)
        resume = self._parse(state)
        self._next = self._live = None
        self._resumed = resume
        if resume is None:
            self._loaded = None
            return
        self._publish_resumed(resume, state, force=self._loads > 0)
        self._loads += 1
        if not in_dataloader_worker():  # a restarted job's main process says what it resumes, once
            control = self.statedir.control()
            log.info("epoch %d: resuming %s saved by world size %d x %d workers, now rank %d of world size %d",
                     resume.epoch, f"{self._KIND} {self._saved_snapshot(resume).id}", resume.world_size,
                     resume.num_workers, control["rank"], control["world_size"])

    def _published_snapshot(self, snapshot_id: str):
        """The snapshot ``snapshot_id`` as published in the state directory: in a DataLoader worker,
        waits (bounded) for worker 0, which carries it in its state, to publish it at its load."""
        deadline = time.monotonic() + (SNAPSHOT_WAIT_SECONDS if in_dataloader_worker() else 0.0)
        while True:
            for epoch in sorted(self.statedir.published_epochs(), reverse=True):
                snapshot = self.statedir.load(epoch)
                if snapshot is not None and snapshot.id == snapshot_id:
                    return snapshot
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def _publish_resumed(self, resume: Any, state: dict, force: bool):
        """Publishes the saved snapshot as its epoch's and makes that epoch the next one iterated."""
        snapshot = self._saved_snapshot(resume)
        with self.statedir.lock():
            published = self.statedir.load(resume.epoch)
            if published is None or published.id != snapshot.id:
                self.statedir.publish(snapshot)
            generation = self.statedir.restart_at(resume.epoch, resume.token, force)
        self._loaded = LoadedState(resume, generation, state)
        return snapshot

    # what a subclass says
    def _resolve(self, epoch: int, previous):
        raise NotImplementedError

    def _fresh_iteration(self, epoch: int, slot: Slot, snapshot):
        raise NotImplementedError

    def _resumed_iteration(self, resume: Any, epoch: int, slot: Slot):
        raise NotImplementedError

    def _samples(self, it):
        raise NotImplementedError

    def _stats_of(self, snapshot, previous, records: list[dict], control: dict):
        raise NotImplementedError

    def _state_of(self, it, shuffle: dict | None) -> dict:
        raise NotImplementedError

    def _state_before_any_epoch(self) -> dict:
        raise NotImplementedError

    def _merge(self, states: Any) -> dict:
        raise NotImplementedError

    def _parse(self, state: dict):
        raise NotImplementedError

    def _saved_snapshot(self, resume: Any):
        """The snapshot a parsed state resumes, as its epoch's."""
        raise NotImplementedError
