"""Items cross from real DataLoader workers packed (wdsrefresh/crossing.py, segments.py) and arrive
exactly as torch's own path delivers them: same types, same values, bytes never overwritten while held."""

from __future__ import annotations

import hashlib
import os
import pickle
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data._utils.collate import default_collate, default_convert
from test_tensors import _write

import wdsrefresh as wr
from wdsrefresh.pipeline import crossing, segments

LARGE = 300_000  # a batch holding two of these crosses in a segment (segments.LARGE)


def _todays(items):
    """torch's conversion, through a function that is not default_convert itself: nothing is packed."""
    return default_convert(items)


def _same(a, b) -> bool:
    """Equal values of the very same types, all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def _shards(directory, sizes, shards=3, per_shard=20, seed=5) -> dict:
    rng = random.Random(seed)
    expected = {}
    for shard in range(shards):
        samples = [{"__key__": f"s{shard}-{i:03d}", "bin": rng.randbytes(sizes[i % len(sizes)]),
                    "cls": str(i % 10).encode(), "json": b'{"i": %d}' % i} for i in range(per_shard)]
        _write(str(directory), f"shard-{shard}.tar", samples)
        expected.update({s["__key__"]: s["bin"] for s in samples})
    return expected


PIPELINES = {
    "to_tuple, batched": lambda ds: ds.to_tuple("bin", "cls", "json").batched(8),
    "dict batches": lambda ds: ds.batched(8),
    "decoded, numbers to tensors": lambda ds: ds.decode().to_tuple("bin", "cls").batched(8),
    "samples, unbatched": lambda ds: ds.to_tuple("__key__", "bin"),
}


@pytest.mark.parametrize("persistent", [False, True], ids=["fresh-workers", "persistent"])
@pytest.mark.parametrize("sizes", [[0, 1, 700], [LARGE, 5, 0]], ids=["small", "large"])
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_batches_from_two_workers_are_todays_batches(tmp_path, pipeline, sizes, persistent):
    _shards(tmp_path, sizes)
    ds = PIPELINES[pipeline](wr.RefreshingWebDataset(str(tmp_path), shardshuffle=False, index_cache=False))
    ours = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent, timeout=120)
    todays = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent,
                                         collate_fn=_todays, timeout=120)
    for epoch in range(2):
        ds.set_epoch(epoch)
        got, want = list(ours), list(todays)
        assert len(got) == len(want) > 0
        assert all(_same(a, b) for a, b in zip(got, want))


def _digests(batch, collate) -> list[str]:
    payloads = batch[1].tolist() if collate else batch[1]
    return [hashlib.sha256(p).hexdigest() for p in payloads]


@pytest.mark.parametrize("collate", [None, wr.collate_tensors], ids=["default", "collate_tensors"])
def test_a_hundred_held_batches_keep_their_bytes(tmp_path, collate):
    expected = _shards(tmp_path, [LARGE, 1000, LARGE], shards=4, per_shard=13)
    ds = wr.RefreshingWebDataset(str(tmp_path), shardshuffle=False, index_cache=False).to_tuple("__key__", "bin")
    ds = ds.batched(4) if collate is None else ds.batched(4, collation_fn=collate)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True,
                                         prefetch_factor=4, timeout=120)
    held = []
    epoch = 0
    while len(held) < 100:
        ds.set_epoch(epoch)
        for batch in loader:
            held.append((batch, _digests(batch, collate)))
        epoch += 1
    for batch, digests in held:  # later batches were written after these arrived: none of them over these
        assert _digests(batch, collate) == digests
        assert [expected[k] for k in batch[0]] == (batch[1].tolist() if collate else batch[1])


def _batch_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("wdsrefresh-batch" in line for line in f)


@pytest.mark.skipif(not segments.available(), reason="no memfd or /proc here: large blobs go through the pipe")
def test_released_segments_are_reused_and_held_ones_are_not(tmp_path):
    _shards(tmp_path, [LARGE], shards=2, per_shard=40)
    ds = wr.RefreshingWebDataset(str(tmp_path), shardshuffle=False, index_cache=False).to_tuple("bin").batched(
        2, collation_fn=wr.collate_tensors)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, persistent_workers=True, timeout=120)
    before = _batch_mappings()
    for epoch in range(3):  # 120 batches, each dropped at once: a few segments serve them all
        ds.set_epoch(epoch)
        for (payloads,) in loader:
            assert payloads.data.numel() >= LARGE
    assert _batch_mappings() - before <= segments.KEEP
    ds.set_epoch(3)
    held = [payloads for (payloads,) in loader]
    assert len({p.data.data_ptr() for p in held}) == len(held) == 40  # every held batch in memory of its own
    del held, payloads
    ds.set_epoch(4)  # all 40 free again: the worker keeps a few and closes the rest
    for (payloads,) in loader:
        pass
    del payloads
    assert _batch_mappings() - before <= segments.KEEP


def test_a_large_column_arrives_as_a_view_of_shared_memory(tmp_path):
    _shards(tmp_path, [LARGE], shards=1, per_shard=8)
    ds = wr.RefreshingWebDataset(str(tmp_path), index_cache=False).to_tuple("bin").batched(
        8, collation_fn=wr.collate_tensors)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, timeout=120)
    (payloads,) = next(iter(loader))
    if segments.available():
        assert _batch_mappings() >= 1
    assert all(len(p) == LARGE for p in payloads.tolist())


@pytest.mark.parametrize("collate", [None, wr.collate_tensors], ids=["default", "collate_tensors"])
def test_pin_memory_loader_yields_the_same_batches(tmp_path, collate):
    _shards(tmp_path, [LARGE, 3])
    ds = wr.RefreshingWebDataset(str(tmp_path), shardshuffle=False, index_cache=False).to_tuple("__key__", "bin")
    ds = ds.batched(4) if collate is None else ds.batched(4, collation_fn=collate)
    plain = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, timeout=120))
    with pytest.warns(UserWarning) if not torch.accelerator.is_available() else _nothing():
        pinned = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, pin_memory=True, timeout=120))
    assert [_digests(b, collate) for b in pinned] == [_digests(b, collate) for b in plain]
    if collate is not None and torch.accelerator.is_available():
        assert all(b[1].data.is_pinned() for b in pinned)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.skipif(not torch.accelerator.is_available(), reason="page-locked memory needs an accelerator")
def test_packed_bytes_pin_memory_copies_into_page_locked_memory():
    packed = wr.PackedBytes.pack([b"abc", b"", b"de"])
    pinned = packed.pin_memory()
    assert pinned.data.is_pinned() and pinned == packed


def test_a_collate_fn_of_the_users_gets_the_batch_itself(tmp_path):
    _shards(tmp_path, [10])
    seen_types = []

    def collate(item):
        seen_types.append(type(item))
        return item

    ds = wr.RefreshingWebDataset(str(tmp_path), shardshuffle=False, index_cache=False).to_tuple("bin", "cls").batched(4)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=collate, timeout=120))
    assert batches and all(type(b) is tuple and type(b[0]) is list for b in batches)
    samples = wr.RefreshingWebDataset(str(tmp_path), shardshuffle=False, index_cache=False).to_tuple("bin", "cls")
    auto = list(torch.utils.data.DataLoader(samples, batch_size=5, num_workers=2, timeout=120))  # default_collate
    by_hand = list(torch.utils.data.DataLoader(samples, batch_size=5, num_workers=2, timeout=120,
                                               collate_fn=lambda batch: default_collate(batch)))
    assert sum(len(b[0]) for b in auto) == 60 and all(_same(a, b) for a, b in zip(auto, by_hand))


@pytest.mark.parametrize("item", [
    (["a", "b"], [b"x", b""], [1, 2]),
    [[b"1", b"22"], np.arange(3), torch.ones(2), "text", None, b"single"],
    {"__key__": ["k1", "k2"], "jpg": [b"\xff" * 3, b"\x00"], "cls": np.array([3, 4]), "empty": []},
    ([b"only", b"bytes"],),
    (["no bytes"], [1]),
    "a string",
    (),
], ids=["tuple", "list", "dict", "one-field", "no-bytes", "scalar", "empty"])
@pytest.mark.parametrize("large", [False, True], ids=["pipe", "segment"])
def test_packed_items_unpickle_as_default_convert_makes_them(item, large):
    if large and isinstance(item, (tuple, list)):
        item = type(item)([*item, [b"L" * segments.LARGE, b"l"]])
    elif large and isinstance(item, dict):
        item = {**item, "big": [b"L" * segments.LARGE]}
    sent = default_convert(crossing.pack(item))  # what the worker's fetcher sends: a Packed passes as it is
    assert _same(pickle.loads(pickle.dumps(sent)), default_convert(item))


def test_without_segments_large_blobs_go_through_the_pipe(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "available", lambda: False)  # as on a platform without memfd (workers fork)
    expected = _shards(tmp_path, [LARGE, 2])
    for collate in (None, wr.collate_tensors):
        ds = wr.RefreshingWebDataset(str(tmp_path), shardshuffle=False, index_cache=False).to_tuple("__key__", "bin")
        ds = ds.batched(4) if collate is None else ds.batched(4, collation_fn=collate)
        got = {}
        for keys, payloads in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, timeout=120):
            got.update(zip(keys, payloads.tolist() if collate else payloads))
        assert got == expected


SAMPLES = [
    {"__key__": "a", "jpg": b"1", "cls": b"2", "png": b"3"},
    {"__key__": "b", "png": b"4", "cls": b"5"},
    {"__key__": "c", "jpg": None, "cls": b"6"},
    {"__key__": "d", "cls": b"7"},
]


@pytest.mark.parametrize("args, kw", [
    (("jpg", "cls"), {}),
    (("jpg;png", "cls"), {}),
    (("jpg png",), {}),
    (("cls",), {}),
    (("jpg", "cls"), {"missing_is_error": False}),
    (("jpg", "cls"), {"none_is_error": False}),
    (("jpg;png", "cls"), {"missing_is_error": False, "none_is_error": True}),
], ids=["plain", "alternatives", "spaces", "one", "missing-ok", "none-ok", "missing-ok-none-not"])
def test_to_tuple_yields_what_webdatasets_yields(args, kw):
    def run(stage):
        for handler in (wds.ignore_and_continue, wds.ignore_and_stop):
            yield list(stage(*args, handler=handler, **kw)(iter(SAMPLES)))

    from wdsrefresh.pipeline.tuples import ToTuple

    assert list(run(lambda *a, **k: ToTuple(*a, **k))) == list(run(wds.filters.to_tuple))
    with pytest.raises(ValueError) as ours:
        list(ToTuple("jpg", "cls")(iter(SAMPLES)))
    with pytest.raises(ValueError) as theirs:
        list(wds.filters.to_tuple("jpg", "cls")(iter(SAMPLES)))
    assert str(ours.value) == str(theirs.value)


@pytest.mark.skipif(not segments.available(), reason="no memfd or /proc here")
def test_a_segment_that_cannot_be_mapped_says_which_worker_and_fd():
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(wr.AttachError, match=f"worker {os.getpid()}'s fd {fd} is not the batch segment"):
            segments.attach(segments.Ref(os.getpid(), fd, b"t" * 16, 1, 10))
    finally:
        os.close(fd)
    with pytest.raises(wr.AttachError, match=r"cannot open DataLoader worker 1's batch segment \(fd 999999\)"):
        segments.attach(segments.Ref(1, 999999, b"u" * 16, 1, 10))
