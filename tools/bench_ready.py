"""How soon a fresh shard is in the snapshot once its writer is done: close (or rename) to set_epoch.

    python tools/bench_ready.py [--trials 5] [--interval 0.05]

A writer process writes each shard either in place at its final name (as webdataset's
ShardWriter and img2dataset do) or under a temporary name renamed into place, and prints the
wall-clock time of its close (or rename). Meanwhile the training process calls ``set_epoch``
every ``--interval`` seconds; the latency is the first snapshot holding the shard minus that
time. Each case runs with a watcher (``watch=True``) and rescanning (``watch=False``), then
again in a process without CAP_LEASE on files another user owns, where no read lease can say
the writer is done and the ``settle`` rule (10 s) applies to files written in place.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import wdsrefresh as wr  # noqa: E402
from shardutil import make_samples, tar_bytes  # noqa: E402

NOBODY = 65534
WRITER = """
import os, sys, time
path, how, owner = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(sys.argv[4], "rb").read()
target = path if how == "in_place" else os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
if owner >= 0:
    os.fchown(fd, owner, owner)  # before the write: ctime does not pass mtime
for i in range(0, len(data), 65536):
    os.write(fd, data[i:i + 65536])
    time.sleep(0.001)  # a writer that takes a moment, as a real one does
os.close(fd)
if how == "rename":
    os.rename(target, path)
print(time.time(), flush=True)
"""


def trial(directory: str, n: int, how: str, watch: bool, owner: int, data_file: str, interval: float) -> float:
    """One shard written while set_epoch runs every ``interval`` s: seconds from close to snapshot."""
    name = f"shard-{n:04d}.tar"
    with wr.RefreshingWebDataset(directory, watch=watch, index_cache=False) as ds:
        ds.set_epoch(0)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, os.path.join(directory, name), how, str(owner),
                                   data_file], stdout=subprocess.PIPE, text=True)
        epoch, deadline = 1, time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                snap = ds.set_epoch(epoch)
                seen = time.time()
                epoch += 1
                if any(s.url.endswith(name) for s in snap.shards):
                    done = float(writer.communicate(timeout=30)[0])
                    return seen - done
                time.sleep(interval)
        finally:
            writer.kill()
            writer.wait()
    raise TimeoutError(f"{name} was not in a snapshot after 60 s")


OPENER = """
import sys, time
longest = 0.0
for _ in range(int(sys.argv[2])):
    started = time.monotonic()
    with open(sys.argv[1], "r+b"):
        longest = max(longest, time.monotonic() - started)
    time.sleep(0.002)
print(longest, flush=True)
"""


def writer_open_wait(opens: int = 200) -> tuple[float, int]:
    """The longest a writer's open waited while this process resolved a pending file in a loop
    (each probe takes and releases a read lease), and how many probes ran meanwhile."""
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "a.tar")
        with open(path, "wb") as f:
            f.write(tar_bytes(make_samples("s", 10))[:3000])  # incomplete: pending, so every epoch probes it
        probes = 0
        with wr.RefreshingWebDataset(root, watch=False, index_cache=False) as ds:
            ds.set_epoch(0)
            opener = subprocess.Popen([sys.executable, "-c", OPENER, path, str(opens)], stdout=subprocess.PIPE,
                                      text=True)
            while opener.poll() is None:
                ds.set_epoch(probes)
                probes += 1
        return float(opener.communicate(timeout=30)[0]), probes


def run_cases(trials: int, interval: float, foreign: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        os.chmod(root, 0o755)
        data_file = os.path.join(root, "data")
        with open(data_file, "wb") as f:
            f.write(tar_bytes(make_samples("s", 200, size=4096)))
        n = 0
        for how in ("in_place", "rename"):
            for watch in (True, False):
                latencies = []
                for _ in range(trials):
                    n += 1
                    latencies.append(trial(root, n, how, watch, NOBODY if foreign else -1, data_file, interval))
                rows.append({"writer": how, "watch": watch, "lease": not foreign,
                             "median": statistics.median(latencies), "max": max(latencies)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="shards written per case (default 5)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between set_epoch calls (0.05)")
    parser.add_argument("--foreign", action="store_true", help=argparse.SUPPRESS)  # the child run, without CAP_LEASE
    args = parser.parse_args()
    if args.foreign:
        print(json.dumps(run_cases(args.trials, args.interval, foreign=True)))
        return
    rows = run_cases(args.trials, args.interval, foreign=False)
    print("cases with a read lease done; now without CAP_LEASE (written in place: about 10 s a shard) ...",
          file=sys.stderr, flush=True)
    child = subprocess.run(["setpriv", "--bounding-set=-lease", "--inh-caps=-lease", sys.executable, __file__,
                            "--foreign", "--trials", str(args.trials), "--interval", str(args.interval)],
                           stdout=subprocess.PIPE, text=True, check=True)
    rows += json.loads(child.stdout)
    longest, probes = writer_open_wait()
    print(f"a writer's open, 200 times while set_epoch probed the file {probes} times: longest wait "
          f"{longest * 1e3:.2f} ms")
    print(f"{'writer':<9} {'watch':<6} {'lease':<6} {'median s':>9} {'max s':>7}")
    for r in rows:
        print(f"{r['writer']:<9} {str(r['watch']):<6} {str(r['lease']):<6} {r['median']:>9.3f} {r['max']:>7.3f}")


if __name__ == "__main__":
    main()
