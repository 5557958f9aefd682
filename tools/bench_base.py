"""``tools/bench.py --base COMMIT``: HEAD against another commit of wdsrefresh, interleaved in one run.

The commit is checked out once as a git worktree under ``--data`` (``bench_data/base-<commit>``,
reused after). Every reader runs in a process of its own (``bench_base_child.py``) with one
tree first on ``PYTHONPATH``: this checkout's (HEAD, with what the working tree holds) or the
commit's, so both sides pay the same pipe round trip. The readers of both trees take turns in
every round of bench.py's ``interleaved_rates``; a row's ratio is the median of the rounds'
paired ratios HEAD / base, so load from other jobs falls on both alike.

Rows, for each shard set of the bench: in one process, ``verify`` inline and off; through a
DataLoader with the bench's workers and batch, inline with webdataset's collation and with
``wr.collate_tensors``; then ``set_epoch`` on ``--scale`` unchanged one-sample shards, rescanned
and watched. ``--aa`` runs the commit against itself instead: the spread of those ratios
around 1.00 is the noise of the machine. ``--cpu`` rates passes by the CPU seconds they took
(the reader's process and its DataLoader workers) instead of the wall clock: on a machine
shared with other jobs, that is what the load changes least.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import ONE_PROC, Row, bench_set, chosen_sets, paired_ratio, rounds_of
from bench_pipe import PassServer
from bench_resolve import ensure_scale_dirs

HERE = Path(__file__).resolve().parent
HEAD_TREE = HERE.parent
CHILD = HERE / "bench_base_child.py"
LIMIT = 0.95  # every paired ratio HEAD / base must be at least this


def base_tree(root: Path, commit: str) -> tuple[Path, str]:
    """The worktree of ``commit`` under ``root`` (made once) and the commit's full hash."""
    def git(*command: str) -> str:
        return subprocess.run(["git", "-C", str(HEAD_TREE), *command], check=True, capture_output=True,
                              text=True).stdout.strip()

    full = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    root.mkdir(parents=True, exist_ok=True)
    tree = (root / f"base-{full[:12]}").resolve()
    if not (tree / "wdsrefresh" / "__init__.py").exists():
        print(f"making the worktree {tree} of {full[:12]} ...", file=sys.stderr, flush=True)
        git("worktree", "add", "--detach", "--force", str(tree), full)
    return tree, full


def child_env(tree: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree)
    return env


def server(tree: Path, kind: str, directory: str, *options: str, cpu: bool = False) -> PassServer:
    reader = PassServer([sys.executable, str(CHILD), kind, directory, *options, *(["--cpu"] if cpu else [])],
                        child_env(tree), f"--base ({tree})", prepares=True)
    imported = reader.ready.split(maxsplit=1)[1].strip()
    if not imported.startswith(str(tree)):
        raise SystemExit(f"--base: the reader meant to run {tree} imported {imported}")
    return reader


def base_chooser(head: Path, base: Path, args):
    """A ``readers_for`` for bench_set: each wdsrefresh reader of the bench, from both trees."""

    def choose(mode: str, spec, urls: list[str], directory: str, state_root: str, _args=None) -> list[tuple]:
        if mode == ONE_PROC:
            kinds = [("inline", ()), ("off", ())]
        else:
            loader = ("--workers", str(args.workers), "--batch", str(args.batch),
                      "--members", ",".join(spec.extensions))
            kinds = [("inline", loader), ("tensors", loader)]
        return [(f"{side} {kind}", server(tree, kind, directory, *options, cpu=args.cpu), None)
                for kind, options in kinds for side, tree in (("HEAD", head), ("base", base))]

    return choose


def scale_rows(head: Path, base: Path, root: Path, args) -> list[Row]:
    """``set_epoch`` on ``args.scale`` unchanged shards, rescanned and watched, from both trees."""
    plain, _ = ensure_scale_dirs(str(root), args.scale)
    rows = []
    for kind in ("rescan", "watched"):
        readers = [(f"{side} set_epoch {kind}", server(tree, kind, plain, cpu=args.cpu)) for side, tree in
                   (("HEAD", head), ("base", base))]
        rates, per_round = rounds_of(readers, args.scale, args)
        for (name, _), (rate, passes), rounds in zip(readers, rates, per_round):
            rows.append(Row(f"scale-{args.scale}", "1 proc", name, rate, passes, 0.0, rounds))
            print(f"  scale-{args.scale} {name:36s} {rate:12,.0f} shards/s ({passes} passes)", file=sys.stderr,
                  flush=True)
    return rows


def pairs(rows: list[Row]) -> list[tuple[Row, Row, float]]:
    """(HEAD's row, base's row, the median of their rounds' ratios) of every reader."""
    base = {(r.shard_set, r.mode, r.reader.removeprefix("base ")): r for r in rows if r.reader.startswith("base ")}
    return [(r, b, paired_ratio(r.rounds, b.rounds)) for r in rows if r.reader.startswith("HEAD ")
            for b in [base[(r.shard_set, r.mode, r.reader.removeprefix("HEAD "))]]]


def base_report(rows: list[Row], head_name: str, base_name: str, args) -> str:
    import torch

    lines = [
        f"{head_name} against {base_name}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs; {'CPU seconds' if args.cpu else 'wall clock'}; each reader in a process of its "
        f"own, both trees interleaved, median of "
        f"{args.repeat} rounds of at least {args.min_time} s each; ratio: median of the rounds' paired ratios; "
        f"warm page cache{'; --quick' if args.quick else ''}; load average at the end: {os.getloadavg()[0]:.1f}",
        "",
        "| shards | mode | reader | HEAD /s | base /s | HEAD / base | rounds' ratios | |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for head, base, ratio in pairs(rows):
        each = " ".join(f"{h / b:.2f}" for h, b in zip(head.rounds, base.rounds))
        lines.append(f"| {head.shard_set} | {head.mode} | {head.reader.removeprefix('HEAD ')} | {head.rate:,.0f} | "
                     f"{base.rate:,.0f} | {ratio:.3f} | {each} | {'ok' if ratio >= LIMIT else 'BELOW ' + str(LIMIT)} |")
    return "\n".join(lines)


def run_base(args) -> None:
    base, full = base_tree(Path(args.data), args.base)
    root = Path(args.data)
    head, head_name = (base, f"{full[:12]} (A/A)") if args.aa else (HEAD_TREE, f"HEAD ({HEAD_TREE})")
    specs = chosen_sets(args)
    choose = base_chooser(head, base, args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wdsrefresh-bench-") as state_root:
        for spec in specs:
            rows += bench_set(root, spec, args, state_root, choose)
    if args.scale:
        rows += scale_rows(head, base, root, args)
    print(base_report(rows, head_name, f"base {full[:12]}", args))
