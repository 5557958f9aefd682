"""Invariants 1, 2, 3, 7 with real torch.distributed ranks (gloo on 127.0.0.1) and real workers."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import ddp_check  # noqa: E402
from shardutil import write_shard  # noqa: E402


@pytest.mark.timeout(300)
@pytest.mark.parametrize("persistent", [False, True])
def test_every_sample_once_equal_per_rank_while_writer_changes_directory(tmp_path, procs, persistent):
    directory, out = tmp_path / "shards", tmp_path / "out"
    directory.mkdir()
    out.mkdir()
    for i in range(4):
        write_shard(str(directory), f"seed{i}.tar", 10 + 3 * i)
    records = ddp_check.run(str(directory), str(out), world_size=2, num_workers=2, persistent=persistent,
                            epochs=5, batch_size=4, procs=procs, timeout=240)
    totals = ddp_check.check(records, world_size=2)
    assert totals["epochs"] == 5 and totals["yielded"] > 0


@pytest.mark.timeout(300)
def test_three_ranks_uneven_shards_exact_split(tmp_path, procs):
    directory, out = tmp_path / "shards", tmp_path / "out"
    directory.mkdir()
    out.mkdir()
    for i, n in enumerate([1, 50, 7, 13, 2, 33, 19]):
        write_shard(str(directory), f"u{i}.tar", n)
    records = ddp_check.run(str(directory), str(out), world_size=3, num_workers=2, persistent=False,
                            epochs=3, batch_size=5, with_writer=False, procs=procs, timeout=240)
    totals = ddp_check.check(records, world_size=3)
    assert totals["samples"] == 3 * 125
    assert totals["left_out"] == 3 * (125 % 3) and totals["skipped"] == 0 and totals["padded"] == 0


def _resolve_on_empty_directory(rank, port, directory, out):
    import torch.distributed as dist

    import wdsrefresh as wr

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ds = wr.RefreshingWebDataset(directory, min_shards=1, timeout=0.5)
    try:
        ds.set_epoch(0)
        outcome = "no error"
    except Exception as exn:  # noqa: BLE001 - the test records what each rank saw
        outcome = f"{type(exn).__name__}: {exn}"
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.timeout(120)
def test_rank0_resolve_error_reaches_every_rank_instead_of_hanging(tmp_path, procs):
    import multiprocessing as mp

    directory, out = tmp_path / "empty", tmp_path / "out"
    directory.mkdir()
    out.mkdir()
    ctx = mp.get_context("spawn")
    port = ddp_check.free_port()
    ranks = [ctx.Process(target=_resolve_on_empty_directory, args=(r, port, str(directory), str(out)))
             for r in range(2)]
    for p in ranks:
        p.start()
        procs.append(p)
    for p in ranks:
        p.join(timeout=90)
    assert [p.exitcode for p in ranks] == [0, 0]
    seen = [(out / f"rank{r}.txt").read_text() for r in range(2)]
    assert seen[0].startswith("NotEnoughShardsError") and "empty" in seen[0]
    assert seen[1].startswith("RankZeroError") and "NotEnoughShardsError" in seen[1]
