"""`wr.Writer`: samples made in memory become published shards; a reader never sees a partial one."""

import os

import pytest
from webdataset.writer import default_handlers, encode_based_on_extension

import wdsrefresh as wr
from wdsrefresh.format import manifest
from wdsrefresh.format.tario import index_shard


def sample(i):
    return {"__key__": f"part/{i:04d}", "bin": os.urandom(50 + i), "txt": f"héllo {i}", "cls": i % 3,
            "json": {"i": i, "tags": ["a", "b"]}, "__meta__": "not written"}


def read_all(ds, epoch):
    ds.set_epoch(epoch)
    return {s["__key__"]: {k: bytes(v) for k, v in s.items() if not k.startswith("__")} for s in ds}


def hidden(out):
    return [n for n in os.listdir(out) if n.startswith(".writer-")]


def test_reader_started_before_close_sees_whole_shards_only_and_everything_after(tmp_path):
    out = str(tmp_path / "out")
    written = [sample(i) for i in range(12)]
    ds = None
    with wr.Writer(out, maxcount=5) as w:
        for i, s in enumerate(written):
            w.write(s)
            if i == 7:  # shard 0 published, shard 1 three samples in
                assert len(hidden(out)) == 1
                ds = wr.RefreshingWebDataset(out, shardshuffle=False, watch=False, verify="inline")
                first = read_all(ds, 0)
    assert sorted(first) == [f"part/{i:04d}" for i in range(5)]
    expected = {s["__key__"]: {k: v for k, v in encode_based_on_extension(s, default_handlers).items()
                               if not k.startswith("_")} for s in written}  # as webdataset's writer encodes
    assert read_all(ds, 1) == expected
    entries = manifest.load(os.path.join(out, "manifest.json"))
    assert [e.url for e in entries] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [e.nsamples for e in entries] == [5, 5, 2]
    for e in entries:
        index = index_shard(os.path.join(out, e.url))
        assert (index.digest, index.blocks, index.nsamples) == (e.digest, e.blocks, e.nsamples)
    assert hidden(out) == [] and os.listdir(os.path.join(out, "manifest.d")) == []


def test_error_in_the_block_publishes_no_partial_shard(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="producer failed"):
        with wr.Writer(out, maxcount=5, prefix="w") as w:
            for i in range(7):
                w.write(sample(i))
            raise RuntimeError("producer failed")
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["manifest.d", "w-000000.tar"]
    assert hidden(out) == []
    ds = wr.RefreshingWebDataset(out, shardshuffle=False, watch=False)
    assert sorted(read_all(ds, 0)) == [f"part/{i:04d}" for i in range(5)]  # the finished shard, listed by its fragment


def test_numbering_continues_after_existing_shards_and_maxsize_bounds_shards(tmp_path):
    out = str(tmp_path / "out")
    with wr.Writer(out, maxcount=100, maxsize="10KB") as w:
        for i in range(6):
            w.write({"__key__": f"a{i}", "bin": bytes(3000)})
    with wr.Writer(out) as w:
        w.write({"__key__": "b0", "bin": b"x"})
    entries = manifest.load(os.path.join(out, "manifest.json"))
    assert [e.url for e in entries] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert all(e.filesize <= 10_000 for e in entries)
    assert [e.nsamples for e in entries] == [2, 2, 2, 1]  # 3 samples of 3584 bytes + 1024 would pass 10KB


def test_values_that_cannot_be_encoded_are_refused_naming_the_sample(tmp_path):
    with wr.Writer(str(tmp_path / "out")) as w:
        with pytest.raises(ValueError, match=r"sample 'k': cannot encode the float under 'weird'"):
            w.write({"__key__": "k", "weird": 1.5})
        with pytest.raises(ValueError, match="non-empty string __key__"):
            w.write({"jpg": b"x"})
        with pytest.raises(Exception, match="'..'"):
            w.write({"__key__": "../escape", "jpg": b"x"})
