"""collate_tensors: batches of payloads as one uint8 tensor plus offsets, through real DataLoader workers."""

from __future__ import annotations

import os
import pickle
import random

import pytest
import torch
from shardutil import tar_bytes

import wdsrefresh as wr


def _write(directory: str, name: str, samples: list[dict]) -> None:
    """Published as a producer does (see shardutil.write_shard): last written a second ago, then renamed."""
    tmp = os.path.join(directory, "_tmp." + name)
    with open(tmp, "wb") as f:
        f.write(tar_bytes(samples))
    written = os.stat(tmp).st_mtime_ns - 1_000_000_000
    os.utime(tmp, ns=(written, written))
    os.replace(tmp, os.path.join(directory, name))


def _samples(prefix: str, n: int, rng: random.Random) -> list[dict]:
    """Payloads of every awkward size: empty, odd, a tar block exactly, large (past a read chunk)."""
    sizes = [0, 1, 511, 512, 513, 300_000]
    return [{"__key__": f"{prefix}{i:04d}", "bin": rng.randbytes(sizes[i % len(sizes)] or rng.randrange(0, 3000)),
             "cls": str(i % 10).encode()} for i in range(n)]


def test_payloads_round_trip_exactly_through_two_dataloader_workers(tmp_path):
    rng = random.Random(7)
    expected = {}
    for shard in range(4):
        samples = _samples(f"s{shard}-", 30, rng)
        _write(str(tmp_path), f"shard-{shard}.tar", samples)
        expected.update({s["__key__"]: (s["bin"], s["cls"]) for s in samples})
    ds = (wr.RefreshingWebDataset(str(tmp_path), shardshuffle=False, index_cache=False)
          .to_tuple("__key__", "bin", "cls").batched(16, collation_fn=wr.collate_tensors))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, timeout=120)
    seen = {}
    for keys, payloads, labels in loader:
        assert isinstance(payloads, wr.PackedBytes) and isinstance(labels, wr.PackedBytes)
        assert payloads.data.dtype == torch.uint8 and len(payloads) == len(keys)
        for key, payload, view, label in zip(keys, payloads.tolist(), payloads.views(), labels.tolist()):
            assert key not in seen
            seen[key] = (payload, label)
            assert bytes(view) == payload
    assert seen == expected


def test_dict_batches_pack_bytes_stack_tensors_and_keep_strings():
    batch = wr.collate_tensors([
        {"__key__": "a", "jpg": b"xy", "cls": 3, "emb": torch.ones(2)},
        {"__key__": "b", "jpg": b"", "cls": 4, "emb": torch.zeros(2)},
    ])
    assert batch["__key__"] == ["a", "b"]
    assert batch["jpg"].tolist() == [b"xy", b""]
    assert torch.equal(batch["cls"], torch.tensor([3, 4]))
    assert batch["emb"].shape == (2, 2)


def test_items_are_views_and_pickling_keeps_them():
    packed = wr.PackedBytes.pack([b"abc", b"", b"de"])
    assert len(packed) == 3
    assert packed[0].tolist() == list(b"abc") and packed[-1].tolist() == list(b"de")
    assert packed[1].numel() == 0
    again = pickle.loads(pickle.dumps(packed))
    assert again == packed and again.tolist() == [b"abc", b"", b"de"]
    with pytest.raises(IndexError):
        packed[3]


def test_an_empty_column_and_mismatched_samples():
    assert wr.PackedBytes.pack([]).tolist() == []
    with pytest.raises(ValueError, match="different lengths"):
        wr.collate_tensors([(b"a", b"b"), (b"a",)])
    with pytest.raises(ValueError, match="other keys"):
        wr.collate_tensors([{"a": b"1"}, {"b": b"2"}])
