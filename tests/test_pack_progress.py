"""pack's progress bar and its summary line count the same bytes: the shards'."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
from tqdm import tqdm

CLI = [sys.executable, "-m", "wdsrefresh.cli"]


def on_a_terminal(args: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    """Runs the command with stderr on a pseudo-terminal (so the bar shows); (result, what it showed)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        r = subprocess.run(CLI + args, stdout=subprocess.PIPE, stderr=terminal, text=True, timeout=120)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    return r, shown.decode(errors="replace")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_the_bar_ends_at_the_shard_bytes_the_summary_reports(tmp_path, jobs):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(30):  # small members: headers and padding are most of a shard
        (src / f"{i:03d}.bin").write_bytes(bytes([i]) * 1000)
        (src / f"{i:03d}.cls").write_bytes(b"7")
    r, shown = on_a_terminal(["pack", str(src), "-o", str(out), "--maxcount", "10", "--jobs", jobs])
    assert r.returncode == 0, shown
    shard_bytes = sum(os.path.getsize(out / n) for n in os.listdir(out) if n.endswith(".tar"))
    payload = 30 * 1001
    assert shard_bytes > 2 * payload  # so the two cannot be mistaken for each other
    done = tqdm.format_sizeof(shard_bytes, divisor=1000)
    finished = [line for line in re.split(r"[\r\n]", shown) if "pack: 100%" in line]
    assert finished and f"| {done}/{done} " in finished[-1], shown
    assert f": {shard_bytes / 1e6:.1f} MB in " in r.stdout  # the summary: the same bytes
