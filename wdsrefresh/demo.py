"""``wdsrefresh demo``: a tiny training loop on a directory that grows between epochs.

The loop a user runs: shards packed from raw files, training reading them, a producer
dropping more files and packing them into the same directory, the next epoch reading them.

Also holds the deterministic example-shard generator used by tools/make_example_shards.py.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from .format.atomic import write_atomic

NUM_CLASSES = 4
DIM = 16
PER_SHARD = 128


def _sample(rng: np.random.Generator, centers: np.ndarray) -> tuple[bytes, bytes]:
    label = int(rng.integers(NUM_CLASSES))
    x = (centers[label] + rng.normal(0, 1.0, DIM)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue(), str(label).encode()


def write_example_shard(directory: str, index: int, per_shard: int = PER_SHARD, seed: int = 0) -> str:
    """Writes example shard ``index`` (16-d features, 4 classes) safely: temporary name, then rename."""
    centers = np.random.default_rng(1234).normal(0, 3.0, (NUM_CLASSES, DIM))
    rng = np.random.default_rng(seed * 100003 + index)
    path = os.path.join(directory, f"example-{index:06d}.tar")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(index * per_shard, (index + 1) * per_shard):
            for ext, data in zip(("input.npy", "cls"), _sample(rng, centers)):
                info = tarfile.TarInfo(f"sample{i:07d}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    write_atomic(path, buf.getvalue())
    return path


def drop_raw_files(directory: str, index: int, per_shard: int = PER_SHARD, seed: int = 0) -> str:
    """What a data pipeline drops: one file per sample field (``sampleN.input.npy``, ``sampleN.cls``)."""
    centers = np.random.default_rng(1234).normal(0, 3.0, (NUM_CLASSES, DIM))
    rng = np.random.default_rng(seed * 100003 + index)
    raw = os.path.join(directory, f"raw-{index:06d}")
    os.makedirs(raw)
    for i in range(index * per_shard, (index + 1) * per_shard):
        for ext, data in zip(("input.npy", "cls"), _sample(rng, centers)):
            with open(os.path.join(raw, f"sample{i:07d}.{ext}"), "wb") as f:
                f.write(data)
    return raw


def _find_example_shards(given: str | None) -> str | None:
    if given:
        return given
    repo = Path(__file__).resolve().parents[1] / "example_shards"
    return str(repo) if repo.is_dir() else None


def run(args) -> int:
    workdir = tempfile.mkdtemp(prefix="wdsrefresh-demo-")
    try:
        data = os.path.join(workdir, "shards")
        source = _find_example_shards(args.shards)
        if source:
            shutil.copytree(source, data)
        else:
            os.makedirs(data)
            for i in range(4):
                write_example_shard(data, i)
        print(f"training on {data} (copied from {source or 'generated shards'}), "
              f"{args.workers} DataLoader workers")
        _train(data, workdir, args.epochs, args.workers)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _train(data: str, workdir: str, epochs: int, workers: int) -> None:
    import torch

    import wdsrefresh as wr
    from wdsrefresh.write.pack import pack_entries

    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ds = wr.RefreshingWebDataset(data, seed=0).shuffle(256).decode().to_tuple("input.npy", "cls").batched(32)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    next_index = 1 + max(int(p.stem.split("-")[-1]) for p in Path(data).glob("example-*.tar"))
    previous = None
    try:
        for epoch in range(epochs):
            start = time.time()
            snap = ds.set_epoch(epoch)
            added, removed = snap.diff(previous)
            seen, total_loss, batches = 0, 0.0, 0
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(y))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seen, total_loss, batches = seen + len(y), total_loss + loss.item(), batches + 1
            print(f"epoch {epoch}  snapshot {snap.id[:8]}  shards {len(snap.shards):2d} "
                  f"(+{len(added)} -{len(removed)})  samples {seen:5d}  "
                  f"loss {total_loss / max(batches, 1):.3f}  ({time.time() - start:.1f}s)")
            previous = snap
            entries = pack_entries([drop_raw_files(workdir, next_index)], data, prefix="example")
            print(f"  producer: dropped {PER_SHARD} samples as files; pack published "
                  f"{', '.join(e.url for e in entries)}")
            next_index += 1
    finally:
        ds.close()
