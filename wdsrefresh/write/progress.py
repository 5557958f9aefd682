"""The progress of a pack: a bar with MB/s and samples/s on a terminal, nothing otherwise.

The bar counts shard bytes (tar headers, padding and end-of-archive markers included), as the
summary line the command prints at the end either way (``cli.py``) does: at the end of a pack
the bar's total is the summary's bytes.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class PackProgress:
    """Counts shard bytes as they are written (``total_bytes``: the planned shards' sizes) and
    samples as their tasks finish."""

    def __init__(self, total_bytes: int, total_samples: int, desc: str = "pack"):
        from tqdm import tqdm

        self.total_samples = total_samples
        self.samples = 0
        self.start = time.monotonic()
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                        disable=not sys.stderr.isatty())

    def bytes_done(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def task_done(self, task: Any) -> None:
        self.samples += len(task.samples)
        rate = self.samples / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.samples}/{self.total_samples} samples, {rate:,.0f} samples/s")

    def __enter__(self) -> PackProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
