"""The columnar snapshot a checkpoint carries: exact round trip, hostile documents refused with a
clear error, and a size bound (<= 120 bytes per shard + 8 per 4 MiB block; docs/resume.md
gives the measured 114)."""

from __future__ import annotations

import pickle
import random

import pytest

from wdsrefresh.epoch.resume import ResumeError, SavedPosition, make_state, parse, snapshot_doc
from wdsrefresh.core.snapshot import ShardInfo, Snapshot, snapshot_id
from wdsrefresh.core.columns import ColumnsError, decode, decode_lazy, encode, with_offsets
from wdsrefresh.epoch.split import Piece

BLOCK = 4 << 20


def shard(rng: random.Random, i: int, root: str = "/data/shards/", remote: bool = False) -> ShardInfo:
    size = rng.randrange(1, 3 * BLOCK)
    with_digest = rng.random() < 0.8
    name = f"part{i % 7}/shard-{i:06d}.tar"
    return ShardInfo(
        url=root + name, path=root + name, size=size, mtime_ns=rng.randrange(1 << 62), inode=rng.randrange(1 << 40),
        device=rng.randrange(1 << 20), nsamples=rng.randrange(0, 10_000),
        digest=f"xxh3_128:{rng.randrange(1 << 128):032x}" if with_digest else None,
        blocks=rng.randbytes(8 * -(-size // BLOCK)) if with_digest else None, name=name,
        etag=f'"{rng.randrange(1 << 64):x}"' if remote else None,
        version_id=f"v{i}" if remote and i % 2 else None,
    )


def snapshot(shards) -> Snapshot:
    shards = tuple(shards)
    return Snapshot(7, shards, snapshot_id(shards))


@pytest.mark.parametrize("remote", [False, True])
def test_round_trip_is_exact(remote):
    rng = random.Random(3)
    root = "s3://bucket/prefix/" if remote else "/data/shards/"
    snap = snapshot(shard(rng, i, root, remote) for i in range(200))
    assert decode(pickle.loads(pickle.dumps(encode(snap)))) == snap


def test_round_trip_without_a_common_root_and_with_paths_unlike_urls():
    rng = random.Random(4)
    shards = [shard(rng, i, root=f"/disk{i % 3}/") for i in range(30)]
    shards = [ShardInfo(**{**s.__dict__, "path": "/mnt" + s.path}) for s in shards]
    snap = snapshot(shards)
    doc = encode(snap)
    assert "urls" in doc and "paths" in doc
    assert decode(doc) == snap


def test_empty_snapshot_round_trips():
    snap = snapshot(())
    assert decode(encode(snap)) == snap


def test_every_truncation_or_bit_flip_is_refused_or_decodes_to_the_same_ids():
    """Hostile documents: a changed column either fails with ColumnsError or still matches the id
    (a flip in a field the id does not cover, such as an inode); never another exception."""
    rng = random.Random(5)
    snap = snapshot(shard(rng, i) for i in range(20))
    doc = encode(snap)
    for column, value in doc.items():
        if not isinstance(value, (bytes, str)) or not value:
            continue
        for _ in range(30):
            cut = rng.randrange(len(value))
            for bad in (value[:cut], _flip(value, cut)):
                try:
                    got = decode({**doc, column: bad})
                except ColumnsError:
                    continue
                assert got.id == snap.id


def _flip(value, at: int):
    if isinstance(value, bytes):
        return value[:at] + bytes([value[at] ^ 0x55]) + value[at + 1:]
    return value[:at] + chr(ord(value[at]) ^ 0x15) + value[at + 1:]


@pytest.mark.parametrize("bad,message", [
    ({"count": -1}, "count: -1 is negative"),
    ({"count": True}, "count: expected int"),
    ({"size": [1, 2]}, "size: expected bytes"),
    ({"flags": b"\x07"}, "flags: 1 bytes for 3 shards"),
    ({"digests": "a\0b"}, "digests: 2 values for 3 shards"),
    ({"blocks": b"x" * 10_000}, "blocks: 10000 bytes, the shards' sizes call for"),
    ({"block_size": bytes(24)}, "block size 0"),
])
def test_malformed_columns_name_what_is_wrong(bad, message):
    snap = snapshot(shard(random.Random(6), i) for i in range(3))
    with pytest.raises(ColumnsError, match=message):
        decode({**encode(snap), **bad})


def test_a_shard_name_with_a_nul_cannot_be_checkpointed():
    s = shard(random.Random(7), 0)
    s = ShardInfo(**{**s.__dict__, "name": "a\0b", "url": "/x/a\0b", "path": "/x/a\0b"})
    with pytest.raises(ValueError, match="NUL"):
        encode(snapshot([s]))


def test_rank_state_within_120_bytes_per_shard_plus_8_per_block_and_consumers_stay_small():
    """At 20k shards: worker 0's state (which carries the snapshot) fits the per-shard bound, and
    another worker's state (position only, shuffle buffer aside) does not grow with the shards."""
    rng = random.Random(8)
    n = 20_000
    snap = snapshot(shard(rng, i) for i in range(n))
    nblocks = sum(len(s.blocks or b"") // 8 for s in snap.shards)
    fingerprint = {"source": "directory '/data/shards'", "seed": 0, "shardshuffle": True, "partial": False}
    stats = {"yielded": 10, "quota": 20, "skipped": 0, "padded": 0}

    def state(worker: int, pieces=None) -> dict:
        position = SavedPosition(0, worker, 3, 5, stats, pieces)
        return make_state(fingerprint, 7, snapshot_doc(snap, carry=worker == 0), 1, 2, [position.as_dict()])

    carrier = len(pickle.dumps(state(0)))
    other = len(pickle.dumps(state(1)))
    assert carrier <= 120 * n + 8 * nblocks + other
    assert other <= 1024
    redistributed = SavedPosition(0, 1, 0, 0, stats, tuple(Piece(i, 0, 5) for i in range(1000)))
    assert len(pickle.dumps(redistributed.as_dict())) <= 24 * 1000 + 1024
    whole = parse(state(0), fingerprint)
    named = parse(state(1), fingerprint, find_snapshot=lambda sid: whole.snapshot if sid == snap.id else None)
    assert named.snapshot == whole.snapshot == snap


def test_a_state_naming_a_snapshot_nobody_carries_says_what_to_load():
    snap = snapshot(shard(random.Random(9), i) for i in range(3))
    fingerprint = {"source": "s", "seed": 0, "shardshuffle": True, "partial": False}
    state = make_state(fingerprint, 7, snapshot_doc(snap, carry=False), 1, 2,
                       [SavedPosition(0, 1, 0, 0).as_dict()])
    with pytest.raises(ResumeError, match="load the whole state"):
        parse(state, fingerprint)


@pytest.mark.parametrize("offsets", [False, True])
def test_lazy_table_gives_the_same_shards_counts_and_pickles_small(offsets):
    rng = random.Random(10)
    snap = snapshot(shard(rng, i, remote=bool(i % 2)) for i in range(500))
    lazy = decode_lazy(with_offsets(encode(snap)) if offsets else encode(snap))
    assert lazy.id == snap.id and len(lazy.shards) == 500
    assert lazy.shards[-1] == snap.shards[-1] and lazy.shards[3:6] == snap.shards[3:6]
    assert lazy.sample_counts() == [s.nsamples for s in snap.shards] and lazy.nsamples == snap.nsamples
    assert tuple(lazy.shards) == snap.shards
    again = pickle.loads(pickle.dumps(lazy))
    assert tuple(again.shards) == snap.shards
    assert len(pickle.dumps(lazy)) < len(pickle.dumps(snap)) / (1.2 if offsets else 1.5)
    with pytest.raises(IndexError):
        lazy.shards[500]


def test_paths_unlike_urls_are_found_by_their_offsets_too():
    rng = random.Random(11)
    shards = [shard(rng, i, root=f"/disk{i % 3}/") for i in range(40)]
    snap = snapshot(ShardInfo(**{**s.__dict__, "path": "/mnt" + s.path}) for s in shards)
    assert tuple(decode_lazy(with_offsets(encode(snap))).shards) == snap.shards
