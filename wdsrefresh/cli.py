"""The ``wdsrefresh`` command: pack | ingest | verify | ls | index | status | stats | demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a tiny model on example shards while a producer adds shards between epochs",
        description="Copies example_shards/ into a temporary directory and trains a tiny model "
        "with a DataLoader of 2 workers for several epochs; between epochs a producer drops raw "
        "sample files and packs them into a new shard, which the next epoch reads. Prints one "
        "line per epoch.",
    )
    p.add_argument("--shards", default=None, help="directory of example shards (default: the repository's example_shards/)")
    p.add_argument("--epochs", type=int, default=4, help="number of epochs (default: 4)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: 2)")
    p.set_defaults(run=lambda args: __import__("wdsrefresh.demo", fromlist=["run"]).run(args))


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def _fail(command: str, exn: BaseException) -> int:
    print(f"wdsrefresh {command}: error: {exn}", file=sys.stderr)
    return 1


def _at_least(minimum: int):
    """An argparse type: a whole number no smaller than ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_at_least_one = _at_least(1)
_at_least_zero = _at_least(0)


def _storage_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` (a VALUE starting with '{' is read as JSON, for client_kwargs and
    config_kwargs). Errors name the key, never the value: it may be a secret."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
    if value.startswith("{"):
        import json

        try:
            return key, json.loads(value)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"{key}: a value starting with '{{' must be a JSON object") from None
    return key, value


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", dest="storage_options", action="append", type=_storage_option, default=[],
                   metavar="KEY=VALUE", help="for s3:// URLs (repeatable): endpoint_url, region_name, profile, "
                   "key, secret, token, attempts, backoff, client_kwargs={...}, config_kwargs={...}; unset "
                   "ones come from the standard AWS chain (environment, AWS_ENDPOINT_URL, profiles, roles). "
                   "Values are never printed")


def _options(args: argparse.Namespace) -> dict | None:
    return dict(args.storage_options) or None


def _add_shard_options(p: argparse.ArgumentParser) -> None:
    from .write.pack import DEFAULT_MAXCOUNT, DEFAULT_MAXSIZE, DEFAULT_PREFIX, format_size

    p.add_argument("-o", "--out", required=True, metavar="OUT", help="where the shards go: a local directory "
                   "(created if needed) or an object-store prefix, s3://bucket/prefix/ (see --storage-option)")
    p.add_argument("--maxcount", type=_at_least_one, default=DEFAULT_MAXCOUNT,
                   help="samples per shard at most (default: %(default)s)")
    p.add_argument("--maxsize", default=format_size(DEFAULT_MAXSIZE), help="bytes per shard at most, e.g. "
                   "500MB, 1GiB (default: %(default)s); a bigger sample gets a shard of its own, with a warning")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="shard names are PREFIX-NNNNNN.tar; a plain name of "
                   "letters, digits, '-', '_' and '.', not starting with '.' (default: %(default)s)")
    _add_storage_options(p)


def _run_pack(args: argparse.Namespace) -> int:
    import time

    from .write.pack import PackError, run_pack

    if args.task_index is not None and args.tasks is None:
        return _fail("pack", ValueError("--task-index needs --tasks"))
    tasks, task_index = args.tasks or 1, args.task_index or 0
    start = time.monotonic()
    try:
        report = run_pack(args.src, args.out, maxcount=args.maxcount, maxsize=args.maxsize,
                          prefix=args.prefix, jobs=args.jobs, follow_symlinks=args.follow_symlinks,
                          shuffle=args.shuffle, label_from_dir=args.label_from_dir, exclude=args.exclude,
                          strict=args.strict, allow_duplicate_keys=args.allow_duplicate_keys, engine=args.engine,
                          tasks=tasks, task_index=task_index, storage_options=_options(args))
    except (PackError, OSError, ValueError, TypeError) as exn:  # TypeError: an unknown storage option
        return _fail("pack", exn)
    seconds = time.monotonic() - start
    print(_pack_summary(args, report, tasks, task_index, seconds))
    return 0


def _pack_summary(args: argparse.Namespace, report, tasks: int, task_index: int, seconds: float) -> str:
    """The one line `pack` prints: what it did, how fast, what it skipped."""
    n = len(report.strays)
    skipped = f"; skipped {n} file{'s' * (n != 1)} that belong{'s' * (n == 1)} to no sample" if n else ""
    if report.committed_before:
        return (f"nothing to do: these inputs were packed into {args.out} before "
                f"({report.nsamples} samples in {len(report.entries)} shards){skipped}")
    share = f" (task {task_index} of {tasks})" if tasks > 1 else ""
    earlier = f"; {report.earlier} of them written by an earlier, interrupted run" if report.earlier else ""
    rate = f"{report.nsamples / seconds:,.0f} samples/s, {report.nbytes / 1e6 / seconds:,.1f} MB/s" if seconds else ""
    if report.pending:
        state = f"; {report.pending} shards of the pack left to other tasks (the last to finish commits)"
    else:
        state = ""
    return (f"packed {report.nsamples} samples into {len(report.entries)} shards in {args.out}{share}: "
            f"{report.nbytes / 1e6:.1f} MB in {seconds:.1f} s ({rate}){earlier}{state}{skipped}")


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="pack files into tar shards and update the manifest",
        description="Packs the files under each SRC into new tar shards in OUT. Files are grouped "
        "into samples by webdataset's rule (dir/a.jpg and dir/a.cls are sample dir/a). Shards are "
        "named PREFIX-NNNNNN.tar, numbered after the highest shard already in OUT (or reserved by a "
        "pack still running there), each written under a hidden temporary name, fsynced and renamed, "
        "its manifest entry saved in OUT/manifest.d/; at the end OUT/manifest.json (wids shard index "
        "v1 plus digests) is updated atomically. OUT may be an object-store prefix, s3://bucket/prefix/: "
        "each shard is then uploaded whole (multipart above 64 MiB) with a conditional PUT that never "
        "replaces an object, its manifest.d/ entry (size, ETag, digests, count) is written after it, and "
        "manifest.json is updated with a conditional PUT, so readers listing the prefix at any moment see "
        "only complete shards. All inputs are checked first: unreadable files, "
        "symlinks leading outside SRC, duplicate keys, keys OUT's shards hold already and an empty "
        "SRC are errors, and nothing is written. Hidden files are skipped, and so are files with no "
        "extension (a README), with a warning (--strict makes them errors). Interrupted (killed, out "
        "of space), the same command run again finishes the same pack without packing any input "
        "twice; run once more after it finished, it does nothing. Array jobs (Slurm): start the same "
        "command with --tasks N --task-index I in N jobs; they agree on one plan, each writes its "
        "share, and the last to finish commits the manifest (if one fails, rerun it, or rerun the "
        "command without --tasks to finish everything). A progress bar (MB/s, samples/s) shows on a "
        "terminal; a summary line is printed at the end.",
    )
    p.add_argument("src", nargs="+", metavar="SRC", help="directory (names relative to it) or file (its base name)")
    _add_shard_options(p)
    p.add_argument("--shuffle", type=int, metavar="SEED", help="spread samples over the shards in a random order "
                   "fixed by SEED (an integer; the same SEED and inputs pack the same bytes). Without it samples "
                   "go in key order, so a folder per class packs shards of one class each")
    p.add_argument("--label-from-dir", action="store_true", help="add a .cls member to each sample: the number "
                   "of its top folder under SRC, folders numbered in sorted order of their names (as torchvision's "
                   "ImageFolder does); the numbering is written to OUT/classes.json. If OUT has a classes.json, "
                   "its numbering is used, and a pack with a class it lacks is refused")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip files and folders whose "
                   "path relative to SRC, or base name, matches GLOB (fnmatch: *, ?, [..]; '*' also matches '/'); "
                   "repeat for more globs, e.g. --exclude '*.txt' --exclude 'raw/*'")
    p.add_argument("--strict", action="store_true", help="a file with no extension (which belongs to no sample) "
                   "is an error instead of being skipped with a warning")
    p.add_argument("--allow-duplicate-keys", action="store_true", help="pack even when OUT's shards (listed, "
                   "uncommitted or reserved) already hold some of the keys being packed; without it such a pack "
                   "is refused, naming some of the keys, since readers would yield those samples twice")
    p.add_argument("--jobs", type=_at_least_one, default=1, help="shards written in parallel: processes with "
                   "--engine local; CPUs of the local Ray cluster started with --engine ray (default: %(default)s)")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="where the shards are written: "
                   "local (processes on this machine) or ray (Ray tasks on the cluster at RAY_ADDRESS, or on a local "
                   "one started for this pack; pip install 'wdsrefresh[ray]'; every node must see SRC at the same path, "
                   "and OUT: a shared directory, or an s3:// prefix, reached with the same --storage-option values). "
                   "Both write the same bytes (default: %(default)s)")
    p.add_argument("--tasks", type=_at_least_one, metavar="N", help="run as one of N array tasks (Slurm: "
                   "$SLURM_ARRAY_TASK_COUNT): this one writes the plan's shards whose number in the plan is "
                   "congruent to --task-index modulo N")
    p.add_argument("--task-index", type=_at_least_zero, metavar="I", help="this array task's index, 0 to N-1 "
                   "(Slurm: $SLURM_ARRAY_TASK_ID, if the array starts at 0)")
    p.add_argument("--follow-symlinks", action="store_true", help="follow symlinks even when they lead outside SRC")
    p.set_defaults(run=_run_pack)


def _run_ingest(args: argparse.Namespace) -> int:
    import signal

    from .write.ingest import IngestConfig, IngestError, Ingester
    from .write.pack import parse_size

    try:
        config = IngestConfig(args.inbox, args.out, maxcount=args.maxcount, maxsize=parse_size(args.maxsize),
                              settle=args.settle, flush=args.flush, archive=args.archive, prefix=args.prefix,
                              require_done=args.require_done, storage_options=_options(args),
                              journal_dir=args.journal_dir)
        def published(entry) -> None:
            print(f"published {os.path.join(args.out, entry.url)}: {entry.nsamples} samples, {entry.filesize} bytes",
                  flush=True)

        with Ingester(config, on_publish=published) as ingester:
            signal.signal(signal.SIGTERM, lambda *_: ingester.stop())
            ingester.run_once() if args.once else ingester.run_forever()
    except (IngestError, OSError, ValueError, TypeError) as exn:
        return _fail("ingest", exn)
    return 0


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    from .write.ingest import IngestConfig

    p = sub.add_parser(
        "ingest",
        help="turn files dropped into an inbox directory into published shards",
        description="Watches INBOX and packs complete samples into shards in OUT, publishing each "
        "shard atomically and updating OUT/manifest.json; only then are the inputs removed (or "
        "moved to --archive). A sample is complete when a KEY.done marker file exists (the marker "
        "is removed, not packed), or else when all its files were closed after writing and stayed "
        "unchanged for --settle seconds (a close alone is not enough). Files with hidden names (.name) are "
        "ignored: write there and rename into place. A key is published once: a sample whose key OUT "
        "holds already (a file changed or re-created after its sample was published) is moved to "
        "INBOX/.wdsrefresh/conflicts/ with a warning, and listed by `wdsrefresh status --inbox`. "
        "Crash-safe: after kill -9 at any moment, a restart leaves every "
        "input in exactly one published shard (a journal lives in OUT/.wdsrefresh/). OUT may be an "
        "s3://bucket/prefix/ URL: shards are uploaded whole, each described by a manifest.d/ fragment "
        "after it exists, then compacted into manifest.json; the journal then lives on local disk, in "
        "--journal-dir (default INBOX/.wdsrefresh/, never packed). One ingest at a "
        "time per inbox: it holds INBOX/.wdsrefresh-ingest.lock while it runs. Prints one line per "
        "published shard.",
    )
    p.add_argument("inbox", metavar="INBOX", help="directory producers drop files into (must exist; "
                   "neither OUT nor --archive may be inside it, or contain it)")
    _add_shard_options(p)
    p.add_argument("--once", action="store_true", help="publish what is complete now (waiting for files "
                   "still settling), then exit")
    p.add_argument("--settle", type=float, default=IngestConfig.settle,
                   help="seconds a file must stay unchanged (default: %(default)s)")
    p.add_argument("--flush", type=float, default=IngestConfig.flush, help="publish a partial shard when its "
                   "oldest sample has waited this many seconds (default: %(default)s)")
    p.add_argument("--archive", metavar="DIR", help="move inputs here instead of deleting them (same file system)")
    p.add_argument("--require-done", action="store_true", help="take only samples that have a KEY.done marker")
    p.add_argument("--journal-dir", metavar="DIR", help="with an s3:// OUT: the local directory of the crash "
                   "journal and temporary shards (default: INBOX/.wdsrefresh/ingest-<tag of OUT>/)")
    p.set_defaults(run=_run_ingest)


def _run_verify(args: argparse.Namespace) -> int:
    from .write.verify import check

    try:
        report = check(args.target, storage_options=_options(args))
    except (OSError, ValueError, TypeError) as exn:
        return _fail("verify", exn)
    if report.problems:
        _print_table(["SHARD", "PROBLEM", "DETAIL"], [[p.shard, p.kind, p.detail] for p in report.problems])
    verdict = f"{len(report.problems)} problem{'s' * (len(report.problems) != 1)}" if report.problems else "verified"
    print(f"{args.target}: {verdict}: {report.summary()}")
    return 1 if report.problems else 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="re-hash every shard and check it against the manifest",
        description="Reads every shard of OUT (or of MANIFEST, or the one SHARD; each may be an s3:// URL, "
        "e.g. s3://bucket/prefix/, whose objects are re-read pinned to their ETag) once: checks size, "
        "whole-file and block digests, sample count and tar structure against the manifest (shards "
        "of a pack not yet committed: against their entries in OUT/manifest.d/), and reports shard "
        "files the manifest does not list. Without a manifest, a walk of each shard's tar structure "
        "is the check. Prints a table of problems, then a line saying what was checked and what was "
        "not; exits with status 1 when there is any problem (no shard at all is one), 0 otherwise.",
    )
    p.add_argument("target", metavar="OUT|MANIFEST|SHARD", help="shard directory, manifest file or shard file, "
                   "or an s3:// URL of one")
    _add_storage_options(p)
    p.set_defaults(run=_run_verify)


def _run_ls(args: argparse.Namespace) -> int:
    from .storage.backend import backend_for
    from .write.status import format_age
    from .write.verify import listing

    try:
        rows = listing(args.target, storage_options=_options(args))
    except (OSError, ValueError, TypeError) as exn:
        return _fail("ls", exn)
    if not rows:
        print(f"{args.target}: no shards")
        return 0
    table = [[r.shard + (" (uncommitted)" if r.pending else "" if r.listed else " (unlisted)")
              + (" (replaced)" if r.replaced else "") + (" (unreadable)" if r.unreadable else ""), "?" if r.nsamples is None else str(r.nsamples),
              "-" if r.size is None else str(r.size), (r.digest or "-")[:25], format_age(r.age)] for r in rows]
    _print_table(["SHARD", "SAMPLES", "BYTES", "DIGEST", "AGE"], table)
    for r in rows:
        if r.unreadable:
            print(f"(unreadable) {r.shard}: {r.unreadable}")
    if any(r.replaced for r in rows):
        print("(replaced): the shard is no longer the version its manifest entry describes (size, mtime or ETag "
              "differ): SAMPLES and DIGEST are the entry's, BYTES and AGE the current version's; `wdsrefresh "
              f"verify {args.target}` checks it" + ("" if not backend_for(args.target).local else
                                                    ", `wdsrefresh index` rebuilds the manifest"))
    return 0


def _add_ls(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ls",
        help="list shards with samples, size, digest and age",
        description="Lists the shards of OUT (or of MANIFEST, or the one SHARD; each may be an s3:// URL): "
        "sample count and digest from the manifest, size and age (time since last modification) from the "
        "file system or the object listing. "
        "Shards of a pack not yet committed (listed in OUT/manifest.d/) are marked (uncommitted); "
        "shards whose file or object no longer matches its entry (size, mtime or ETag) are marked (replaced); "
        "shards in neither are marked (unlisted) and counted by reading their headers (objects in a store: "
        "not counted, shown as '?'); an unlisted file no reader would read (incomplete, not a tar) is marked "
        "(unreadable), with why below the table.",
    )
    p.add_argument("target", metavar="OUT|MANIFEST|SHARD", help="shard directory, manifest file or shard file, "
                   "or an s3:// URL of one")
    _add_storage_options(p)
    p.set_defaults(run=_run_ls)


def _add_index(sub: argparse._SubParsersAction) -> None:
    def run(args: argparse.Namespace) -> int:
        from .write.index import index_directory

        try:
            result = index_directory(args.dir)
        except (OSError, ValueError) as exn:
            return _fail("index", exn)
        print(f"indexed {len(result.entries)} shards ({sum(e.nsamples or 0 for e in result.entries)} samples) "
              f"into {result.manifest}")
        if not result.skipped:
            return 0
        print(f"left out {len(result.skipped)} shards:")
        _print_table(["SHARD", "REASON"], [[s.shard, s.reason] for s in result.skipped])
        return 1

    p = sub.add_parser(
        "index",
        help="rebuild DIR/manifest.json from the shards in DIR",
        description="Reads every shard file in DIR (*.tar, *.tar.gz, *.tgz; temporary and hidden "
        "names are ignored) once and rewrites DIR/manifest.json from what it finds: sample count, "
        "size, modification time (mtime_ns) and digests of each shard. Use it after copying a "
        "dataset, after a manifest was damaged or lost, or to list shards written by other tools. "
        "A shard that changes while it is read, is incomplete (still being written, or truncated) "
        "or is not a readable tar is left out of the manifest and listed with the reason; the exit "
        "status is then 1 (readers still index such files themselves). The manifest is replaced "
        "atomically, under the same directory lock as pack and ingest. An entry applies only while "
        "its shard keeps the recorded size and mtime_ns: copies made with 'cp -p' or 'rsync -t' "
        "keep both (to the time precision of the target file system); after any other copy, run "
        "index again.",
    )
    p.add_argument("dir", metavar="DIR", help="shard directory")
    p.set_defaults(run=run)


def _run_status(args: argparse.Namespace) -> int:
    import json
    import time

    from .write.status import CONFLICT_REASON, StatusProbe, changes, describe_inbox, format_age, summary

    try:
        prober = StatusProbe(args.target, settle=args.settle, inbox=args.inbox)
        status = prober.take()
    except (OSError, ValueError) as exn:
        return _fail("status", exn)
    if args.json and not args.watch:
        print(json.dumps(status.to_dict(), indent=2))
        return 0
    if not args.watch:
        print(summary(status))
        problems = status.of("pending") + status.of("rejected")
        if problems:
            _print_table(["SHARD", "STATE", "BYTES", "AGE", "REASON"],
                         [[f.name, f.state, "-" if f.bytes is None else str(f.bytes), format_age(f.age_seconds),
                           f.reason or ""] for f in problems])
        if status.inbox is not None:
            print(f"inbox {describe_inbox(status.inbox)}")
            for path in status.inbox.conflicts:
                print(f"conflict {path}: {CONFLICT_REASON}")
        return 0
    # --watch: the first status whole, then one line per change, as it happens
    previous = None
    try:
        while True:
            if args.json:
                if previous is None or list(changes(previous, status)):
                    print(json.dumps(status.to_dict()), flush=True)
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(status.at))
                if previous is None:  # the summary, and what is not ready yet
                    print(summary(status), flush=True)
                    lines = [line for line in changes(None, status) if not line.startswith("ready")]
                else:
                    lines = list(changes(previous, status))
                for line in lines:
                    print(f"{stamp} {line}", flush=True)
            previous = status
            time.sleep(args.interval)
            status = prober.take()
    except (OSError, ValueError) as exn:
        return _fail("status", exn)


def _add_status(sub: argparse._SubParsersAction) -> None:
    from .core.options import DEFAULT_SETTLE

    p = sub.add_parser(
        "status",
        help="ready, pending and rejected shards of a directory, and an ingest backlog",
        description="Judges every shard file of DIR (or of a manifest, glob or brace pattern) by the "
        "reader's readiness rule: ready (a complete shard: its samples are counted), pending (still open "
        "for writing by another process, incomplete, or, where no read lease can tell whether a writer is "
        "done, written in place less than --settle seconds ago) or rejected (not a readable "
        "shard), with the reason. Prints a summary line (ready shards, samples, bytes, the newest "
        "shard's age) and a table of the files that are not ready; with --inbox, the files, samples and "
        "bytes waiting there for ingest. --json prints the same as one JSON document; --watch keeps "
        "printing one line per change (a file appearing, becoming ready, pending or rejected, going; "
        "the inbox changing) until interrupted. Reads shard headers only (never digests) and nothing "
        "of a shard it has seen unchanged.",
    )
    p.add_argument("target", metavar="DIR", help="shard directory (or manifest, glob, brace pattern; file:// URLs)")
    p.add_argument("--json", action="store_true", help="print JSON (with --watch: one document per change)")
    p.add_argument("--watch", action="store_true", help="print one line per change as it happens")
    p.add_argument("--inbox", metavar="INBOX", help="an ingest inbox: report its backlog too")
    p.add_argument("--settle", type=float, default=DEFAULT_SETTLE, help="seconds a file written in place must be "
                   "unchanged to be ready: the readers' settle= (default: %(default)s)")
    p.add_argument("--interval", type=float, default=1.0, help="with --watch: seconds between looks "
                   "(default: %(default)s)")
    p.set_defaults(run=_run_status)


def _run_stats(args: argparse.Namespace) -> int:
    import json

    from .observe.stats_log import read_jsonl
    from .write.status import format_age

    try:
        rows = sorted(read_jsonl(args.path), key=lambda r: (r.epoch, r.rank))  # ranks append in any order
    except (OSError, ValueError) as exn:
        return _fail("stats", exn)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    elif rows:
        def num(value, fmt="{:.0f}") -> str:
            return "-" if value is None else fmt.format(value)

        _print_table(
            ["EPOCH", "RANK", "SHARDS", "SAMPLES", "ADDED", "CHANGED", "REMOVED", "PENDING", "REJECTED", "YIELDED",
             "SAMPLES/S", "WAIT", "LAG"],
            [[str(r.epoch), str(r.rank), str(r.shards), str(r.samples), f"+{r.added}", f"~{r.changed}",
              f"-{r.removed}", str(r.pending), str(r.rejected), str(r.yielded), num(r.samples_per_second),
              num(None if r.wait_share is None else 100 * r.wait_share, "{:.0f}%"), format_age(r.lag_seconds)]
             for r in rows])
    else:
        print(f"{args.path}: no epochs yet")
    if args.plot:
        from .observe.plot import PlotUnavailable, plot

        try:
            plot(rows, args.plot, title=args.title, dpi=args.dpi)
        except PlotUnavailable as exn:
            return _fail("stats", exn)
        except (OSError, ValueError) as exn:
            return _fail("stats", exn)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="a training run's per-epoch stats (stats.jsonl), as a table or a figure",
        description="Reads PATH, the stats.jsonl a RefreshingWebDataset(stats_dir=...) appends to (one "
        "line per epoch and rank), or the directory holding it, and prints one row per line: the "
        "snapshot's shards and samples, shards added, changed and removed since the epoch before, "
        "pending and rejected files, samples yielded, samples/s, the share of the loop spent waiting "
        "for data (under wr.timed) and lag. --plot FILE draws shards, samples, churn, lag, samples/s per "
        "rank (on a scale that an outlier does not flatten) and waiting per rank over epochs, each on axes of "
        "its own (needs matplotlib: pip install 'wdsrefresh[plot]').",
    )
    p.add_argument("path", metavar="PATH", help="a stats.jsonl file, or the stats_dir holding one")
    p.add_argument("--plot", metavar="FILE", help="write the figure to FILE (.png, .svg, .pdf)")
    p.add_argument("--title", help="the figure's title")
    from .observe.plot import DPI, FIGSIZE

    (width, height) = FIGSIZE
    p.add_argument("--dpi", type=_at_least_one, default=DPI, help=f"the figure is {width:g} x {height:g} inches at "
                   f"this many dots per inch (default: %(default)s: {width * DPI:g} x {height * DPI:g} pixels)")
    p.add_argument("--json", action="store_true", help="print the lines as one JSON list")
    p.set_defaults(run=_run_stats)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wdsrefresh",
        description="Tools for WebDataset shard directories that change while training reads them.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: wdsrefresh's INFO lines; -vv: its DEBUG lines too; -vvv: every library's")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_pack(sub)
    _add_ingest(sub)
    _add_verify(sub)
    _add_ls(sub)
    _add_index(sub)
    _add_status(sub)
    _add_stats(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (| head): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _configure_logging(verbosity: int) -> None:
    """Warnings of every library; -v adds wdsrefresh's INFO, -vv its DEBUG, -vvv everyone's DEBUG
    (watchdog's included, which logs every event)."""
    logging.basicConfig(level=logging.DEBUG if verbosity >= 3 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    ours = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.getLogger("wdsrefresh").setLevel(ours)


if __name__ == "__main__":
    sys.exit(main())
