"""``tools/bench.py --peers``: LitData next to wdsrefresh and webdataset, on the same samples, in one run.

LitData is never a dependency of the project: it lives in a venv of its own under ``--data``
(``bench_data/peers-venv``), made on the first ``--peers`` run with ``pip install torch
litdata`` under the project's constraints.txt (the CPU build of torch 2.13.0, the Makefile's
way) and reused after; its path is printed. Without the package registry that step fails with
pip's own last lines; the rest of the bench does not need it.

For each shard set of the bench, ``bench_peers_child.py export`` (run by the peers venv's
python) reads the shards' samples back with the standard library's tarfile, grouped as
webdataset groups them, and writes them once, in order, in LitData's own format
(``BinaryWriter``, 64 MB chunks, no compression) into ``<set directory>-litdata`` next to the
shards. ``litdata.StreamingDataset`` then reads that directory in place (no cache copy).

Interleaving: litdata runs in a process of the peers venv, started once per set and mode
(imports done, dataset open, DataLoader workers persistent), that runs one pass whenever this
process asks through a pipe and answers with the pass's sample count, while this process waits.
Such a process is one more reader of bench.py's ``interleaved_rates``: all readers take turns
within each round, so load from other jobs falls on all of them alike, and a rate is the
median of the rounds. Its clock runs here and so includes one pipe round trip: about 20 us here
(a line echoed by a child python, median of 2,000), under 1% of the shortest pass (about 4 ms:
the 256 KiB set of ``--quick``). Running every reader in a subprocess of its own would measure
the same thing with more machinery.

Rows: in one process, webdataset, wdsrefresh (inline, off), the bare walker floor, litdata as
it yields (payloads are memoryviews into its chunk file: no copy at all) and litdata with each
payload copied to ``bytes`` (what the tar readers yield); through a DataLoader with the bench's
workers and batch, webdataset and wdsrefresh as in bench.py and litdata's StreamingDataLoader
with a collation into lists of ``bytes`` (see bench_peers_child.py for why not its default).
Ratios are medians of the rounds' paired ratios. The report ends with the targets of issue 26
that need LitData, PASS or MISS (the no-regression target: ``tools/bench.py --base COMMIT``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import webdataset as wds
from bench import (BARE, CEILING, CEILING_TENSORS, CEILING_TORCH, FORMAT_VERSION, INLINE, OFF, ONE_PROC, TENSORS,
                   WEBDATASET, Row, ShardSet, bench_set, chosen_sets, crossing_costs, paired_ratio,
                   readers_for, targets_table, transport_targets)
from bench_pipe import PassServer

import wdsrefresh as wr

PEERS_VENV = "peers-venv"
CHILD = Path(__file__).resolve().with_name("bench_peers_child.py")
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
# of bench.readers_for, next to litdata's
OUR_READERS = (WEBDATASET, INLINE, OFF, BARE, TENSORS, CEILING, CEILING_TORCH, CEILING_TENSORS)
LITDATA, LITDATA_BYTES = "litdata StreamingDataset", "litdata, payloads to bytes"
PIP_TAIL_LINES = 15


def _peer_env() -> dict:
    """The environment of the peers venv's processes: nothing of this project on their path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(what: str, command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=_peer_env())
    except OSError as e:
        raise SystemExit(f"--peers: could not {what}: {e}") from None
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-PIP_TAIL_LINES:])
        raise SystemExit(f"--peers: could not {what}: `{' '.join(command)}` exited with {done.returncode}; "
                         f"its last lines:\n{tail}\n(the peers venv needs the package registry; "
                         f"tools/bench.py without --peers does not)")
    return done.stdout


def ensure_peers_venv(root: Path) -> tuple[Path, str]:
    """The python of the peers venv under ``root`` (created and filled on first use) and its
    litdata's version."""
    venv = (root / PEERS_VENV).resolve()
    python = venv / "bin" / "python"
    installed = venv / ".installed"
    if not installed.exists():
        print(f"creating the peers venv {venv}: torch (constraints.txt) and litdata, about a minute, once ...",
              file=sys.stderr, flush=True)
        _run(f"create a venv at {venv}", [sys.executable, "-m", "venv", "--clear", str(venv)])
        pip = [str(python), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS)]
        _run(f"install torch into {venv} (pinned by {CONSTRAINTS.name})", pip + ["torch"])
        _run(f"install litdata into {venv}", pip + ["litdata"])
        installed.touch()
    version = _run(f"import litdata with {python}", [str(python), "-c", "import litdata; print(litdata.__version__)"])
    version = version.strip()
    print(f"peers venv: {venv} (litdata {version})", file=sys.stderr, flush=True)
    return python, version


def litdata_directory(root: Path, spec: ShardSet) -> Path:
    directory = spec.directory(root)
    return directory.with_name(directory.name + "-litdata")


def ensure_litdata_set(python: Path, root: Path, spec: ShardSet, urls: list[str]) -> str:
    """The set's samples in LitData's format next to its shards, written unless already there."""
    out = litdata_directory(root, spec)
    marker = out / ".complete"
    expected = {"format": FORMAT_VERSION, "samples": spec.samples}
    if not (marker.exists() and json.loads(marker.read_text()) == expected):
        print(f"writing {out} (LitData's format) ...", file=sys.stderr, flush=True)
        said = _run(f"write {out} in LitData's format", [str(python), str(CHILD), "export", str(out), *urls])
        written = int(said.split()[-1])  # the export's last word: the samples it wrote
        if written != spec.samples:
            raise SystemExit(f"--peers: {out}: wrote {written} samples from {len(urls)} shards, "
                             f"expected {spec.samples}")
        marker.write_text(json.dumps(expected))
    return str(out)


def litdata_peer(python: Path, directory: str, *options: str) -> PassServer:
    """``litdata.StreamingDataset`` (or its DataLoader) in a process of the peers venv."""
    return PassServer([str(python), str(CHILD), "serve", directory, *options], _peer_env(), "--peers")


def peer_chooser(python: Path, root: Path, args):
    """A ``readers_for`` for bench_set: our readers of OUR_READERS, then litdata's."""

    def choose(mode: str, spec: ShardSet, urls: list[str], directory: str, state_root: str, args) -> list[tuple]:
        ours = [r for r in readers_for(mode, spec, urls, directory, state_root, args) if r[0] in OUR_READERS]
        litdata = ensure_litdata_set(python, root, spec, urls)
        if mode == ONE_PROC:
            return ours + [(LITDATA, litdata_peer(python, litdata), None),
                           (LITDATA_BYTES, litdata_peer(python, litdata, "--bytes"), None)]
        loader = litdata_peer(python, litdata, "--workers", str(args.workers), "--batch", str(args.batch))
        return ours + [(LITDATA, loader, None)]

    return choose


def peers_report(rows: list[Row], specs: list[ShardSet], litdata_version: str, args) -> str:
    import torch

    lines = [
        f"wdsrefresh {wr.__version__} vs webdataset {wds.__version__} vs litdata {litdata_version} (its own venv); "
        f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs; readers "
        f"interleaved, median of {args.repeat} rounds; ratios: median of the rounds' paired ratios; warm page "
        f"cache{'; --quick' if args.quick else ''}; load average at the end: {os.getloadavg()[0]:.1f}",
        "",
        "| shards | mode | reader | samples/s | MB/s | x webdataset | x litdata |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    by_name = {(r.shard_set, r.mode, r.reader): r for r in rows}
    described = {s.name: f"{s.describe} ({s.shards}x{s.samples_per_shard})" for s in specs}
    for r in rows:
        webdataset = by_name[(r.shard_set, r.mode, WEBDATASET)]
        litdata = by_name[(r.shard_set, r.mode, LITDATA)]
        lines.append(f"| {described[r.shard_set]} | {r.mode} | {r.reader} | {r.rate:,.0f} | {r.mbps:,.0f} | "
                     f"{paired_ratio(r.rounds, webdataset.rounds):.2f}x | {paired_ratio(r.rounds, litdata.rounds):.2f}x |")
    workers_mode = f"loader {args.workers}w b{args.batch}" if args.workers > 0 else None
    lines += targets_table("TARGETS (through DataLoader workers)",
                           transport_targets(rows, workers_mode, LITDATA))
    return "\n".join(lines + crossing_costs(rows, specs))


def run_peers(args) -> None:
    root = Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    python, version = ensure_peers_venv(root)
    specs = chosen_sets(args)
    choose = peer_chooser(python, root, args)
    with tempfile.TemporaryDirectory(prefix="wdsrefresh-bench-") as state_root:
        rows = []
        for spec in specs:
            rows += bench_set(root, spec, args, state_root, choose)
    print(peers_report(rows, specs, version, args))
