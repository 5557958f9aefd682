"""Random mutations of valid shards never hang the reader, never exhaust memory, and end in the
original's samples or a TarError / ShardChangedError naming the shard (tools/fuzz.py).

The fuzz runs in a subprocess with an address-space limit and a watchdog per case, so that a
regression fails this test instead of hanging or swapping the machine; seeds are fixed, and a
failing case is printed with the command that reruns it alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "tools" / "fuzz.py"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", [20240611])
def test_mutated_shards_end_in_original_samples_or_named_errors(seed):
    cases = 400
    proc = subprocess.run(
        [sys.executable, str(FUZZ), "--cases", str(cases), "--seed", str(seed), "--case-seconds", "10",
         "--memory-mib", "1024"],
        capture_output=True, text=True, timeout=150, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"rerun one case with: tools/fuzz.py --seed {seed} --only K\n{report}"
    assert f"{cases} cases, seed {seed}" in proc.stdout and "0 failed checks" in proc.stdout, report
