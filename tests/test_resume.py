"""Mid-epoch checkpoint and resume: StatefulDataLoader states, changed directories, other layouts,
states that do not fit, and a training process killed with SIGKILL."""

from __future__ import annotations

import collections
import copy
import os
import pickle
import random
import signal
import subprocess
import sys

import pytest
from shardutil import write_shard
from torchdata.stateful_dataloader import StatefulDataLoader

import wdsrefresh as wr
from wdsrefresh.epoch.resume import ResumeError, merge, parse, restart, snapshot_rows
from wdsrefresh.epoch.slot import Slot
from wdsrefresh.epoch.split import epoch_seed, split

HERE = os.path.dirname(os.path.abspath(__file__))


def make_shards(directory: str, sizes=(7, 9, 5, 11, 8)) -> None:
    for i, n in enumerate(sizes):
        write_shard(directory, f"s{i:02d}.tar", n)


def make_loader(shard_dir: str, num_workers: int, batch_size: int = 3, **kw):
    ds = wr.RefreshingWebDataset(shard_dir, watch=False, **kw).map(lambda s: s["__key__"])
    loader = StatefulDataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    return ds, loader


def flat(batches) -> list[str]:
    return [k for b in batches for k in b]


def run_interrupted(shard_dir: str, num_workers: int, stop: int, every: int):
    """Batches consumed by a run that saves its state every ``every`` batches and stops after ``stop``:
    (batches covered by the last saved state, that state)."""
    _, loader = make_loader(shard_dir, num_workers)
    state, covered, batches = loader.state_dict(), 0, []
    it = iter(loader)
    for n in range(1, stop + 1):
        batches.append(next(it))
        if n % every == 0:
            state, covered = copy.deepcopy(loader.state_dict()), n
    del it, loader
    return batches[:covered], state


@pytest.mark.parametrize("num_workers,stop,every", [(0, 7, 2), (0, 1, 3), (0, 14, 7), (2, 7, 3), (2, 4, 1)])
def test_resumed_stream_continues_the_uninterrupted_one(shard_dir, num_workers, stop, every):
    make_shards(shard_dir)
    _, loader = make_loader(shard_dir, num_workers)
    uninterrupted = [list(loader), list(loader)]  # two epochs
    assert 0 < stop <= len(uninterrupted[0])

    before, state = run_interrupted(shard_dir, num_workers, stop, every)
    _, loader = make_loader(shard_dir, num_workers)
    loader.load_state_dict(state)
    resumed = [list(loader), list(loader)]
    assert before + resumed[0] == uninterrupted[0]
    assert resumed[1] == uninterrupted[1]


def test_persistent_workers_resume_and_continue(shard_dir):
    make_shards(shard_dir)
    _, loader = make_loader(shard_dir, 2)
    uninterrupted = [list(loader), list(loader)]
    before, state = run_interrupted(shard_dir, 2, stop=5, every=2)
    ds = wr.RefreshingWebDataset(shard_dir, watch=False).map(lambda s: s["__key__"])
    loader = StatefulDataLoader(ds, batch_size=3, num_workers=2, collate_fn=list, persistent_workers=True)
    loader.load_state_dict(state)
    assert before + list(loader) == uninterrupted[0]
    assert list(loader) == uninterrupted[1]


def test_a_loaders_state_carries_the_snapshot_once_and_each_worker_resumes_from_it(shard_dir):
    """With 2 workers the loader's state holds one copy of the snapshot (worker 0's); worker 1,
    whose state only names it, still resumes exactly."""
    make_shards(shard_dir)
    _, loader = make_loader(shard_dir, 2)
    uninterrupted = list(loader)
    before, state = run_interrupted(shard_dir, 2, stop=3, every=3)
    assert pickle.dumps(state).count(b"s03.tar") == 1
    _, loader = make_loader(shard_dir, 2)
    loader.load_state_dict(state)
    assert before + list(loader) == uninterrupted


def test_a_version_2_state_still_loads_and_resumes_its_own_shard_order(shard_dir):
    """A state saved by the previous release (one row per shard in every consumer, shards
    ordered by random.shuffle) resumes the rest of that release's epoch, exactly."""
    make_shards(shard_dir)
    ds = wr.RefreshingWebDataset(shard_dir, watch=False)
    snap = ds.set_epoch(0)
    order = list(range(len(snap.shards)))  # the previous release's order, written out independently
    random.Random(epoch_seed(snap.id, 0, 0)).shuffle(order)
    keys = [f"{snap.shards[i].name[:-4]}/{j:06d}" for i in order for j in range(snap.shards[i].nsamples)]
    consumer = {"rank": 0, "worker": 0, "piece": 1, "offset": 2}  # 2 samples into the second shard
    old = {"format": "wdsrefresh.resume", "version": 2, **ds.sample_source.fingerprint(), "epoch": 0,
           "snapshot": snapshot_rows(snap), "world_size": 1, "num_workers": 1, "consumers": [consumer]}
    resumed, loader = make_loader(shard_dir, 0)
    resumed.load_state_dict(old)
    read = snap.shards[order[0]].nsamples + 2
    assert flat(loader) == keys[read:]


def test_set_epoch_after_loading_a_merged_state_keeps_the_saved_epoch(shard_dir):
    make_shards(shard_dir)
    _, loader = make_loader(shard_dir, 2)
    everything = flat(loader)
    before, state = run_interrupted(shard_dir, 2, stop=4, every=4)
    write_shard(shard_dir, "new.tar", 3)
    ds, loader = make_loader(shard_dir, 1)
    ds.load_state_dict(merge(state))
    assert ds.set_epoch(0).id == state_snapshot_id(state)
    assert collections.Counter(flat(before) + flat(loader)) == collections.Counter(everything)
    ds.set_epoch(1)
    assert sorted(flat(loader)) == sorted(everything + [f"new/{i:06d}" for i in range(3)])


def test_state_saved_at_the_end_of_an_epoch_resumes_with_the_next(shard_dir):
    make_shards(shard_dir)
    ds, loader = make_loader(shard_dir, 0)
    epoch0 = list(loader)
    state = copy.deepcopy(loader.state_dict())
    epoch1 = list(loader)
    ds, loader = make_loader(shard_dir, 0)
    loader.load_state_dict(state)
    assert list(loader) == epoch1
    assert ds.snapshot().epoch == 1 and sorted(flat(epoch0)) == sorted(flat(epoch1))


def test_resume_reads_the_saved_snapshot_and_the_next_epoch_a_fresh_one(shard_dir):
    make_shards(shard_dir)
    _, loader = make_loader(shard_dir, 2)
    everything = set(flat(loader))
    before, state = run_interrupted(shard_dir, 2, stop=5, every=5)
    write_shard(shard_dir, "new.tar", 6)  # appears after the checkpoint

    ds, loader = make_loader(shard_dir, 2)
    loader.load_state_dict(state)
    rest = flat(loader)
    assert collections.Counter(flat(before) + rest) == collections.Counter(everything)
    assert ds.snapshot(0).id == state_snapshot_id(state)
    following = flat(loader)
    assert set(following) == everything | {f"new/{i:06d}" for i in range(6)}
    assert ds.snapshot(1).id != ds.snapshot(0).id


def test_shards_changed_since_the_checkpoint_follow_on_change(shard_dir):
    make_shards(shard_dir, sizes=(6, 6, 6, 6))
    before, state = run_interrupted(shard_dir, 0, stop=2, every=2)
    read = {k.split("/")[0] for k in flat(before)}
    unread = sorted({f"s{i:02d}" for i in range(4)} - read)
    os.unlink(os.path.join(shard_dir, f"{unread[0]}.tar"))  # deleted after the checkpoint

    ds, loader = make_loader(shard_dir, 0, on_change="skip")
    loader.load_state_dict(state)
    rest = flat(loader)
    assert not {k for k in rest if k.startswith(unread[0] + "/")}
    assert not set(flat(before)) & set(rest)
    assert len(flat(before)) + len(rest) == 24 - 6  # every sample once, but the deleted shard's
    assert ds.stats(0).deleted == 1


@pytest.mark.parametrize("new_workers", [0, 3])
def test_resume_with_other_num_workers_reads_each_unread_sample_once(shard_dir, new_workers):
    make_shards(shard_dir)
    _, loader = make_loader(shard_dir, 2)
    everything = flat(loader)
    before, state = run_interrupted(shard_dir, 2, stop=5, every=5)

    ds, loader = make_loader(shard_dir, new_workers)
    ds.load_state_dict(state)  # a StatefulDataLoader state: merged inside
    rest = flat(loader)
    assert collections.Counter(flat(before) + rest) == collections.Counter(everything)
    assert sorted(flat(loader)) == sorted(everything)  # the next epoch: whole, once


def test_redistribution_to_another_world_size_is_exact(shard_dir):
    make_shards(shard_dir, sizes=(13, 4, 9, 21, 6, 10))
    ds = wr.RefreshingWebDataset(shard_dir, watch=False)
    snap = ds.set_epoch(2)
    old_world, old_workers = 2, 3
    consumers, read = [], collections.Counter()
    for r in range(old_world):
        for w in range(old_workers):
            a = split(snap, seed=0, epoch=2, slot=Slot(r, old_world, w, old_workers))
            piece = min(w, len(a.pieces) - 1)
            offset = a.pieces[piece].count // 2
            consumers.append({"rank": r, "worker": w, "piece": piece, "offset": offset})
            for p in a.pieces[:piece]:
                read.update((p.shard, i) for i in range(p.start, p.stop))
            read.update((a.pieces[piece].shard, i) for i in range(a.pieces[piece].start, a.pieces[piece].start + offset))
    from wdsrefresh.epoch.resume import make_state, snapshot_doc
    fingerprint = ds.sample_source.fingerprint()
    state = parse(make_state(fingerprint, 2, snapshot_doc(snap), old_world, old_workers, consumers), fingerprint)

    def old(slot):
        return split(snap, seed=0, epoch=2, slot=slot)

    new = collections.Counter()
    per_rank = []
    for r in range(3):
        n = 0
        for w in range(2):
            a = restart(state, old, Slot(r, 3, w, 2), partial=False).assignment
            new.update((p.shard, i) for p in a.pieces for i in range(p.start, p.stop))
            n += a.quota
        per_rank.append(n)
    everything = collections.Counter((i, j) for i, s in enumerate(snap.shards) for j in range(s.nsamples))
    left_out = everything - read - new
    assert not (read & new) and max(new.values()) == 1 and not (read + new) - everything
    assigned = snap.nsamples - snap.nsamples % old_world  # the old split left the rest out
    unread = assigned - sum(read.values())
    assert len(set(per_rank)) == 1 and sum(per_rank) == unread - unread % 3
    assert sum(left_out.values()) == snap.nsamples % old_world + unread % 3


def state_snapshot_id(loader_state: dict) -> str:
    return merge(loader_state)["snapshot"]["id"]


def one_state(shard_dir: str) -> dict:
    _, loader = make_loader(shard_dir, 0)
    it = iter(loader)
    next(it)
    return merge(loader.state_dict())


def test_state_of_another_dataset_is_refused_by_name(shard_dir, tmp_path):
    make_shards(shard_dir)
    state = one_state(shard_dir)
    other = tmp_path / "other"
    other.mkdir()
    make_shards(str(other))
    with pytest.raises(ResumeError, match="source"):
        wr.RefreshingWebDataset(str(other), watch=False).load_state_dict(state)
    with pytest.raises(ResumeError, match="seed is 0, this dataset's is 5"):
        wr.RefreshingWebDataset(shard_dir, watch=False, seed=5).load_state_dict(state)


@pytest.mark.parametrize("corrupt,message", [
    (lambda s: s.update(version=99), "version 99"),
    (lambda s: s.update(format="x"), "not a wdsrefresh state"),
    (lambda s: s.pop("snapshot"), "snapshot: expected dict"),
    (lambda s: s["snapshot"].update(nsamples=(1000).to_bytes(8, "little") + s["snapshot"]["nsamples"][8:]),
     "does not match its shards"),
    (lambda s: s["snapshot"].update(size="big"), "snapshot.size: expected bytes"),
    (lambda s: s["snapshot"].update(mtime_ns=s["snapshot"]["mtime_ns"][:-8]), "snapshot.mtime_ns: 32 bytes for 5"),
    (lambda s: s["snapshot"].update(names=s["snapshot"]["names"] + "\0x.tar"), "snapshot.names: 6 values for 5"),
    (lambda s: s["snapshot"].update(blocks=s["snapshot"]["blocks"][:-1]), "snapshot.blocks: .* bytes, the shards' sizes call for"),
    (lambda s: s["snapshot"].pop("count"), "names snapshot .* without carrying it"),
    (lambda s: s["consumers"][0].update(rank=7), "rank 7 worker 0 outside"),
    (lambda s: s["consumers"][0].update(piece=None), r"consumers\[0\].piece"),
    (lambda s: s["consumers"][0].update(pieces=[[0, 0, 10 ** 6]]), "does not fit the snapshot"),
    (lambda s: s["consumers"][0].update(pieces=b"\0" * 20), "20 bytes is not a whole number of 3-value rows"),
])
def test_corrupted_state_is_refused_with_what_is_wrong(shard_dir, corrupt, message):
    make_shards(shard_dir)
    state = one_state(shard_dir)
    corrupt(state)
    with pytest.raises(ResumeError, match=message):
        wr.RefreshingWebDataset(shard_dir, watch=False).load_state_dict(state)


def test_position_beyond_the_assignment_is_refused(shard_dir):
    make_shards(shard_dir)
    state = one_state(shard_dir)
    state["consumers"][0]["piece"] = 99
    ds, loader = make_loader(shard_dir, 0)
    ds.load_state_dict(state)
    with pytest.raises(ResumeError, match="beyond its assignment"):
        list(loader)


def test_webdatasets_shuffle_buffer_refuses_a_checkpoint(shard_dir):
    import webdataset as wds

    make_shards(shard_dir)
    ds = wr.RefreshingWebDataset(shard_dir, watch=False).compose(wds.filters.shuffle(10))
    with pytest.raises(RuntimeError, match="shuffle"):
        ds.state_dict()


# ---------------------------------------------------------------------------- the kill test

def _start(args: list[str], pause_at: int, procs: list) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(HERE, "resume_train.py"), *args]
    if pause_at:
        cmd += ["--pause-at", str(pause_at)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, text=True)
    procs.append(p)
    return p


@pytest.mark.parametrize("set_epoch", [False, True])
def test_killed_training_resumes_exactly_and_sees_new_shards_next_epoch(tmp_path, procs, set_epoch):
    shards = tmp_path / "shards"
    shards.mkdir()
    sizes = (9, 14, 6, 11, 10, 8)
    make_shards(str(shards), sizes)
    original = {f"s{i:02d}/{j:06d}" for i, n in enumerate(sizes) for j in range(n)}
    common = [str(shards), "--checkpoint", str(tmp_path / "ckpt.pt"), "--log", str(tmp_path / "log"),
              "--every", "3", "--batch-size", "4", "--num-workers", "2"] + (["--set-epoch"] if set_epoch else [])

    first = _start(common + ["--state-dir", str(tmp_path / "state1")], pause_at=7, procs=procs)
    try:
        line = first.stdout.readline()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # the script and its DataLoader workers
        first.wait(timeout=30)
    assert line == "paused\n", first.stderr.read()
    with open(tmp_path / "log") as f:
        assert len(f.readlines()) == 7 * 4  # 7 batches consumed, the checkpoint covers 6 of them

    write_shard(str(shards), "late.tar", 5)  # added while the job is down
    second = _start(common + ["--state-dir", str(tmp_path / "state2")], pause_at=0, procs=procs)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0 and out.strip() == "done", err

    by_epoch = collections.defaultdict(list)
    with open(tmp_path / "log") as f:
        for line in f:
            epoch, key = line.split()
            by_epoch[int(epoch)].append(key)
    assert sorted(by_epoch) == [0, 1]
    assert collections.Counter(by_epoch[0]) == collections.Counter(original)  # none lost, none repeated
    late = {f"late/{j:06d}" for j in range(5)}
    assert collections.Counter(by_epoch[1]) == collections.Counter(original | late)
