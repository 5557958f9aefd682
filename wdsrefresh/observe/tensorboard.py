"""``wr.log_stats``: the numbers of EpochStats as TensorBoard scalars."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..epoch.stats import EpochStats


SCALARS = (
    "shards", "samples", "shard_bytes", "added", "added_samples", "changed", "changed_samples", "removed",
    "removed_samples", "pending", "rejected", "resolve_seconds", "lag_seconds", "quota", "yielded", "padded",
    "skipped", "left_out", "replaced", "deleted", "corrupt", "bytes_read", "read_seconds", "verify_seconds",
    "seconds", "samples_per_second", "batches", "loop_seconds", "wait_seconds", "wait_share",
)


def log_stats(writer: Any, stats: EpochStats | Sequence[EpochStats], step: int | None = None,
              prefix: str = "wdsrefresh") -> int:
    """Writes the numbers of ``stats`` as scalars to a TensorBoard ``SummaryWriter`` (from
    ``torch.utils.tensorboard``, which needs the ``tensorboard`` package: ``pip install
    wdsrefresh[tensorboard]``) at ``step`` (default: the epoch). Tags are ``PREFIX/FIELD``, or
    ``PREFIX/rankR/FIELD`` for a list of every rank's stats (``ds.stats(epoch, all_ranks=True)``).
    Fields that are None (not measured) are left out; a mix's sources write theirs under
    ``.../source/NAME/FIELD``. Returns the number of scalars written."""
    many = not isinstance(stats, EpochStats)
    written = 0
    for one in (stats if many else [stats]):
        base = f"{prefix}/rank{one.rank}" if many else prefix
        for name in SCALARS:
            value = getattr(one, name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            writer.add_scalar(f"{base}/{name}", value, one.epoch if step is None else step)
            written += 1
        for source, fields in one.sources.items():  # a mix: each source's numbers under its name
            for name, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                    writer.add_scalar(f"{base}/source/{source}/{name}", value, one.epoch if step is None else step)
                    written += 1
    return written
