"""``tools/bench.py --base COMMIT``: wdsrefresh's rows as the code of COMMIT reads them, in the same run.

The commit's files (``git archive``, no worktree) are unpacked once under ``--data``
(``bench_data/base-<commit>``). For each of this run's wdsrefresh readers, a process started
from this directory's ``bench_base.py serve`` puts that tree first on its path, imports its
``wdsrefresh`` before anything of this tree, builds the same reader with this bench's code
(``bench.readers_for``) and runs one pass whenever this process asks through a pipe, as the
LitData reader of ``bench_peers.py`` does (its clock runs here and so holds one pipe round trip,
about 20 us). This tree's reader runs the same way ("head: ..."), so the two differ in their
code only (not in what else their process holds), each takes its turn in every round, and
``head / base`` is a paired ratio.

    python tools/bench_base.py serve BASE_DIR DATA SET MODE READER WORKERS BATCH
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX, HEAD = "base: ", "head: "


def ensure_base_tree(root: Path, commit: str) -> tuple[Path, str]:
    """The files of ``commit`` unpacked under ``root`` (once), and the commit's short hash."""
    repo = HERE.parent
    try:
        full = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"--base {commit}: not a commit of {repo}: {getattr(e, 'stderr', e)}") from None
    tree = (root / f"base-{full[:12]}").resolve()
    if not (tree / ".complete").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(["git", "-C", str(repo), "archive", full], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
        if archive.wait():
            raise SystemExit(f"--base {commit}: git archive failed")
        (tree / ".complete").touch()
    return tree, full[:12]


def _peer_class():
    from bench_peers import LitDataPeer

    class BasePeer(LitDataPeer):
        """A reader of the base tree in a process of its own; ``prepare`` (its ``set_epoch``) runs
        there before the clock starts, as the current reader's does here."""

        def __init__(self, tree: str, *options: str):
            super().__init__(Path(sys.executable), tree, *options, child=Path(__file__).resolve())

        def prepare(self) -> None:
            self.process.stdin.write("prepare\n")
            self.process.stdin.flush()
            if self._line(600.0).strip() != "ok":
                raise SystemExit("--base: the base reader exited mid-run; its error is above")

    return BasePeer


def base_chooser(inner, tree: Path, root: Path):
    """A ``readers_for`` for bench_set: ``inner``'s readers, and after them, for each wdsrefresh
    reader among them, the same reader run by the code of the base tree and by this tree's, each
    in a process of its own started the same way, so that the two differ in their code only."""
    BasePeer = _peer_class()

    def choose(mode, spec, urls, directory, state_root, args) -> list[tuple]:
        readers = inner(mode, spec, urls, directory, state_root, args)
        added = []
        for name, _, _ in readers:
            if name.startswith("wdsrefresh") or name.startswith("(tario"):
                options = [str(root), spec.name, mode, name, str(args.workers), str(args.batch),
                           *(["--quick"] if args.quick else [])]
                added += [(HEAD + name, BasePeer(str(HERE.parent), *options), None),
                          (PREFIX + name, BasePeer(str(tree), *options), None)]
        return readers + added

    return choose


def serve(tree: str, data: str, set_name: str, mode: str, reader: str, workers: int, batch: int,
          quick: bool) -> None:
    sys.path.insert(0, tree)
    import wdsrefresh  # noqa: F401  (the base tree's, before bench puts this tree on the path)

    sys.path.insert(1, str(HERE))
    import tempfile

    import bench

    class Args:
        pass

    args = Args()
    args.workers, args.batch, args.quick = workers, batch, quick
    args.ceilings = False  # the current tree's transport, not the base's: never timed here
    spec = next(s for s in bench.shard_sets(quick) if s.name == set_name)
    urls = bench.ensure_set(Path(data), spec)
    with tempfile.TemporaryDirectory(prefix="wdsrefresh-bench-base-") as state_root:
        chosen = {name: (r, c) for name, r, c in bench.readers_for(mode, spec, urls, str(spec.directory(Path(data))),
                                                                    state_root, args)}
        one, collate = chosen[reader]
        one_pass, close = (bench.one_process(one) if mode == bench.ONE_PROC
                           else bench.data_loader(one, workers, batch, spec.extensions, collate))
        print("ready", wdsrefresh.__file__, flush=True)
        try:
            for line in sys.stdin:
                if line.strip() == "prepare":
                    one.prepare()
                    print("ok", flush=True)
                elif line.strip() == "pass":
                    print(one_pass(), flush=True)
                else:
                    raise SystemExit(f"bench_base: expected 'prepare' or 'pass' on stdin, got {line!r}")
        finally:
            close()


if __name__ == "__main__":
    if len(sys.argv) < 9 or sys.argv[1] != "serve":
        raise SystemExit(__doc__.rsplit("\n\n", 1)[1])
    _, _, tree_, data_, set_, mode_, reader_, workers_, batch_, *rest = sys.argv
    serve(tree_, data_, set_, mode_, reader_, int(workers_), int(batch_), "--quick" in rest)
