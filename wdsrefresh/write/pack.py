"""Packing files into tar shards: grouping into samples, planning, idempotent tasks, a commit.

Files are grouped into samples by webdataset's key rule (``names.split_key``: ``dir/a.b.c``
is extension ``b.c`` of sample ``dir/a``). Samples are written in key order (or in the order
a ``shuffle`` seed fixes), members of a sample in extension order, with ``tarwriter``'s fixed
metadata, so the same tree and options always pack to the same bytes. ``label_from_dir``
adds a ``.cls`` member per sample (``labels.py``).

A pack runs in three steps (the files are described in ``publish.py``):
- **plan**: the inputs are listed, checked and split into tasks (a task is the samples of
  one shard). The plan reserves the shard names after the highest number existing or
  reserved in ``OUT`` by writing ``OUT/.wdsrefresh/plans/plan-<hash>.json`` with an
  exclusive create; the hash covers the inputs (names, sizes, mtimes, sources) and the
  options, so rerunning the same pack finds the same plan and the same names;
- **tasks**: each writes its shard under a hidden temporary name, fsyncs it, renames it to
  its reserved name, then writes its manifest fragment ``OUT/manifest.d/part-*.json``. A
  task whose fragment (or manifest entry) exists is done; a task killed part-way leaves only
  hidden temporary files, or a complete shard that its rerun indexes instead of rewriting;
- **commit**: the fragments are merged into ``OUT/manifest.json`` (atomically) and removed;
  the plan is renamed ``done-<hash>.json``, so running the same pack again finds it done
  and does nothing (a kill can land after the commit, before the command returns).

Tasks run on an engine (``engines.py``: local processes or Ray). An array job under a
scheduler runs ``tasks`` copies of the same pack, copy ``task_index`` running the tasks whose
index is ``task_index`` modulo ``tasks`` (strided, so shard sizes even out across copies);
they share the plan (a shared lock instead of an exclusive one), and the copy that finds
every task finished after its own commits (the last to finish; two at once both commit,
which is harmless).

``OUT`` may be an ``s3://bucket/prefix/`` URL: the same steps with an object store's
primitives (conditional PUTs instead of locks and renames), described in ``destination.py``,
which is where every step above touches the output. Every engine runs its tasks against the
plan's destination, storage options included.

Guarantees of ``pack``:
- every input is checked (names, symlinks, readability, duplicate keys among the inputs and
  against the keys OUT's shards hold, ``keys.py``) before any shard is written; on any such
  error nothing is written;
- killed or failing at any moment (out of space included), the same command run again
  finishes the same plan, or finds it finished: every input ends in exactly one shard, every
  shard is listed once;
- numbering never collides with another pack or ingest into the same directory.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..format.atomic import unlink_quietly
from ..format.manifest import ManifestEntry
from ..format.names import split_key
from ..format.tario import TarError
from ..format.tarwriter import TarWriter, archive_overhead
from ..storage.backend import backend_for
from .destination import DESTINATIONS, Destination, DestinationError, PlanBusy, open_destination
from .keys import duplicates as duplicate_keys
from .keys import record_plan as record_plan_keys
from .model import Member, PackError, Sample
from .publish import named

log = logging.getLogger("wdsrefresh")

DEFAULT_PREFIX = "shard"
DEFAULT_MAXCOUNT = 10_000
DEFAULT_MAXSIZE = 1_000_000_000
PLAN_VERSION = 1
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class InputId:
    """Which file was packed: enough to tell it from a later file under the same name."""

    path: str
    ino: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class WrittenShard:
    """A durable shard under its temporary name, and the exact inputs it holds."""

    tmp_path: str
    nsamples: int
    filesize: int
    digest: str
    blocks: bytes
    inputs: tuple[InputId, ...]
    mtime_ns: int  # a rename keeps it: the published file's, which its manifest entry records

    def entry(self, url: str) -> ManifestEntry:
        return ManifestEntry(url, self.nsamples, self.filesize, self.digest, self.blocks, self.mtime_ns)


def parse_size(text: str | int) -> int:
    """``"1GB"`` -> 10**9, ``"64MiB"`` -> 2**26, ``"1000"`` -> 1000."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r} (examples: 1GB, 500MB, 64MiB, 1000)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(size: int) -> str:
    """``10**9`` -> ``"1GB"``: the shortest text ``parse_size`` reads back as ``size``."""
    for unit in ("TB", "GB", "MB", "KB"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def check_prefix(prefix: str) -> None:
    """Raises PackError unless ``prefix`` is a plain name, so shards stay inside OUT."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise PackError(f"prefix {prefix!r} is not a plain name: use letters, digits, '-', '_' and '.', "
                        "not starting with '.' (shards are named PREFIX-NNNNNN.tar inside the output directory)")


def check_local(path: str) -> None:
    """Raises PackError for a URL (``scheme://...``): for inputs, which are local files."""
    if not backend_for(path).local:
        raise PackError(f"{path}: remote locations are not supported here; give a local path")


def check_destination(out: str | Destination) -> None:
    """Raises PackError for a URL that cannot be written: only ``s3://`` URLs can."""
    if isinstance(out, str) and backend_for(out).name not in DESTINATIONS:
        raise PackError(f"{out}: only s3:// URLs and local directories can be written")


# ---- collecting inputs -------------------------------------------------------------------


def check_name(name: str, path: str) -> None:
    """Raises PackError unless ``name`` is a safe relative member name."""
    parts = name.split("/")
    if name.startswith("/") or os.path.isabs(name):
        raise PackError(f"{path}: member name {name!r} is absolute")
    if ".." in parts or "" in parts or "." in parts:
        raise PackError(f"{path}: member name {name!r} has '..', '.' or empty path components")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise PackError(f"{path}: file name is not valid UTF-8") from None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_symlink(path: str, root_real: str, root: str, follow: bool) -> None:
    target = os.path.realpath(path)
    if not os.path.exists(target):
        raise PackError(f"{path}: dangling symlink (target {target} does not exist)")
    if not follow and not _inside(target, root_real):
        raise PackError(
            f"{path}: symlink points outside {root} (to {target}); not followed "
            "(use --follow-symlinks to include it)"
        )


def excluded(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` (relative to its source) or its base name matches one of the globs."""
    base = name.rpartition("/")[2]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


def walk_tree(root: str, follow_symlinks: bool = False, exclude: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    """Yields ``(name relative to root, path)`` of the regular files under ``root``.

    Hidden names (starting with '.') are skipped, and so are files and directories matching
    an ``exclude`` glob. Symlinks whose target lies outside ``root`` raise PackError unless
    ``follow_symlinks``; symlinked directories inside ``root`` are skipped (their files are
    packed under their real names).
    """
    root_real = os.path.realpath(root)
    visited = {root_real}
    stack = [("", root)]
    while stack:
        rel, directory = stack.pop()
        with os.scandir(directory) as it:
            entries = list(it)
        for entry in entries:
            if entry.name.startswith(".") or (exclude and excluded(rel + entry.name, exclude)):
                continue
            if entry.is_symlink():
                _check_symlink(entry.path, root_real, root, follow_symlinks)
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if (entry.is_symlink() and not follow_symlinks) or real in visited:
                    log.debug("%s: symlinked directory skipped", entry.path)
                    continue
                visited.add(real)
                stack.append((rel + entry.name + "/", entry.path))
            elif entry.is_file():
                yield rel + entry.name, entry.path
            else:
                raise PackError(f"{entry.path}: not a regular file or directory")


def _stat_readable(path: str) -> os.stat_result:
    """The stat of a regular file that can be opened for reading; PackError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exn:
        raise PackError(f"{path}: cannot be read ({exn.strerror})") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise PackError(f"{path}: not a regular file")
    return st


def group_samples(files: Iterable[tuple[str, str, str]], strays: list[str] | None = None) -> list[Sample]:
    """Groups ``(origin, name, path)`` triples into samples by webdataset's key rule.

    Returns samples sorted by key, members sorted by name. Raises PackError for two files
    that would be the same member of a sample (extensions compare lower-cased, as readers
    do), for a key found in two origins, and for a name without an extension, which belongs
    to no sample; given a ``strays`` list, such a file's path is appended there instead.
    """
    by_key: dict[str, dict[str, Member]] = {}
    origin_of: dict[str, str] = {}
    for origin, name, path in files:
        check_name(name, path)
        key, ext = split_key(name)
        if key is None or not ext:
            if strays is None:
                raise PackError(f"{path}: name {name!r} has no extension, so it belongs to no sample")
            strays.append(path)
            continue
        if origin_of.setdefault(key, origin) != origin:
            raise PackError(f"{path}: duplicate key {key!r}: also in {origin_of[key]}")
        members = by_key.setdefault(key, {})
        other = members.get(ext.lower())
        if other is not None:
            raise PackError(f"{path}: duplicate key {key!r}: {other.path} is the same member .{ext.lower()}")
        st = _stat_readable(path)
        members[ext.lower()] = Member(name, path, st.st_size, st.st_mtime_ns)
    return [
        Sample(key, tuple(sorted(members.values(), key=lambda m: m.name)))
        for key, members in sorted(by_key.items())
    ]


def collect(sources: Sequence[str], follow_symlinks: bool = False, exclude: Sequence[str] = (),
            strays: list[str] | None = None) -> list[Sample]:
    """The samples in ``sources`` (directories, whose files are named relative to them, or
    single files, named by their base name), less the files matching an ``exclude`` glob.
    Raises PackError on any bad input or none; files that belong to no sample (no extension)
    are bad input too, unless a ``strays`` list is given to collect their paths."""
    def files() -> Iterator[tuple[str, str, str]]:
        for src in sources:
            if os.path.isdir(src):
                for name, path in walk_tree(src, follow_symlinks, exclude):
                    yield src, name, path
            elif os.path.lexists(src):
                if not excluded(os.path.basename(src), exclude):
                    yield src, os.path.basename(src), src
            else:
                raise PackError(f"{src}: no such file or directory")

    samples = group_samples(files(), strays)
    if not samples:
        raise PackError(f"nothing to pack: no files in {', '.join(sources) or 'no source given'}")
    return samples


# ---- splitting into shards and writing one ------------------------------------------------


def plan_shards(samples: Sequence[Sample], maxcount: int, maxsize: int) -> list[list[Sample]]:
    """Splits samples, in order, into shards of at most ``maxcount`` samples and ``maxsize``
    bytes. A sample bigger than ``maxsize`` alone gets a shard of its own (with a warning)."""
    if maxcount < 1 or maxsize < 1:
        raise ValueError("maxcount and maxsize must be positive")
    shards: list[list[Sample]] = []
    current: list[Sample] = []
    size = archive_overhead()
    for sample in samples:
        need = sample.tar_size
        if current and (len(current) >= maxcount or size + need > maxsize):
            shards.append(current)
            current, size = [], archive_overhead()
        if need + archive_overhead() > maxsize:
            log.warning("sample %r is %d bytes, more than maxsize %d: it gets a shard of its own",
                        sample.key, need, maxsize)
        current.append(sample)
        size += need
    if current:
        shards.append(current)
    return shards


def write_shard(samples: Sequence[Sample], tmp_path: str, progress: Callable[[int], None] | None = None) -> WrittenShard:
    """Writes ``samples`` to the new file ``tmp_path`` and fsyncs it; removes it on error.
    OS errors name ``tmp_path`` (or the input file that failed). ``progress`` is told the shard
    bytes written (headers and padding included), member by member: they add up to its size."""
    inputs = []
    reported = 0

    def report() -> None:
        nonlocal reported
        if progress:
            progress(writer.size - reported)
        reported = writer.size

    try:
        with open(tmp_path, "xb") as f:
            writer = TarWriter(f)
            for sample in samples:
                for m in sample.members:
                    _add_member(writer, m, inputs)
                    report()
            writer.close()
            report()
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exn:
        unlink_quietly(tmp_path)
        if isinstance(exn, OSError):
            raise named(exn, tmp_path) from None
        raise
    assert writer.digest is not None and writer.blocks is not None
    return WrittenShard(tmp_path, len(samples), writer.size, writer.digest, writer.blocks, tuple(inputs),
                        os.stat(tmp_path).st_mtime_ns)


def _add_member(writer: TarWriter, member: Member, inputs: list[InputId]) -> None:
    if member.data is not None:
        writer.add_bytes(member.name, member.data)
    else:
        inputs.append(InputId(member.path, *writer.add_file(member.name, member.path, member.size)))


def shuffled(samples: Sequence[Sample], seed: int) -> list[Sample]:
    """``samples`` in an order that is a pure function of their keys and ``seed``."""
    order = sorted(samples, key=lambda s: s.key)
    random.Random(seed).shuffle(order)
    return order



# ---- plan, tasks, commit ------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """The samples of one shard, and the name reserved for it."""

    index: int
    shard: str
    samples: tuple[Sample, ...]

    @property
    def size(self) -> int:
        """The exact size of the shard in bytes."""
        return sum(s.tar_size for s in self.samples) + archive_overhead()


@dataclass(frozen=True)
class Plan:
    out: str
    hash: str
    path: str
    tasks: tuple[Task, ...]
    committed: bool = False  # done before: nothing to do
    dest: Destination | None = None  # where ``out`` is (made from ``out`` when not given)

    @property
    def destination(self) -> Destination:
        return self.dest if self.dest is not None else open_destination(self.out)

    def unfinished(self) -> list[Task]:
        """Tasks with neither a fragment nor an entry in the committed manifest."""
        committed = self.destination.committed_urls()
        finished = self.destination.finished_tasks(self.hash)
        return [t for t in self.tasks if t.shard not in committed and t.index not in finished]


def plan_hash(sources: Sequence[str], groups: Sequence[Sequence[Sample]], prefix: str, maxcount: int,
              maxsize: int, options: dict | None = None) -> str:
    """What identifies a pack: its sources, its inputs (names, sizes, mtimes), members made in
    memory (labels), the order and grouping, and the options (``options``: those set, such as
    ``shuffle``; unset ones leave the hash as it was before they existed)."""
    h = hashlib.sha256()
    head = {"version": PLAN_VERSION, "sources": _real_sources(sources), "prefix": prefix,
            "maxcount": maxcount, "maxsize": maxsize, **(options or {})}
    h.update(json.dumps(head, sort_keys=True).encode() + b"\n")
    for i, group in enumerate(groups):
        for sample in group:
            row = [i, sample.key, [[m.name, m.size, m.mtime_ns] if m.data is None else [m.name, m.data.hex()]
                                   for m in sample.members]]
            h.update(json.dumps(row).encode() + b"\n")
    return h.hexdigest()


def _real_sources(sources: Sequence[str]) -> list[str]:
    return sorted({os.path.realpath(s) for s in sources})


def paths_overlap(a: str, b: str) -> bool:
    """Whether real paths ``a`` and ``b`` are the same or one lies inside the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


class DuplicateKeysError(PackError):
    """Keys being packed are in OUT's shards already."""


@contextmanager
def open_plan(out: str | Destination, sources: Sequence[str], groups: Sequence[Sequence[Sample]], prefix: str,
              maxcount: int, maxsize: int, *, options: dict | None = None, shared: bool = False,
              allow_duplicate_keys: bool = True, classes: Sequence[str] | None = None) -> Iterator[Plan]:
    """The plan for these inputs: found in ``out`` (committed, or unfinished by an earlier
    run) or made now, reserving its shard names. Held until the block ends: exclusively, or
    ``shared`` with the other array tasks of the same plan (each runs tasks no other runs);
    in a local directory (see ``destination.py`` for object stores, where nothing is held).

    Concurrent callers with the same inputs agree on one plan: it is created under the
    directory lock with an exclusive create, and the others find it. Making a plan records
    its keys (``keys.py``) and writes ``classes`` to ``OUT/classes.json`` (``labels.py``).

    Raises PackError when another process holds this plan (exclusively, or shared while this
    caller wants it exclusively), when an unfinished plan of overlapping sources exists with
    other inputs (packing now would pack some twice), and, unless ``allow_duplicate_keys``,
    DuplicateKeysError when a new plan would pack keys that OUT's shards hold already.
    """
    dest = open_destination(out)
    digest = plan_hash(sources, groups, prefix, maxcount, maxsize, options)
    release = None
    with dest.numbering():
        found = dest.find_plan(digest)
        if found is not None and found.committed:
            path, names = found.location, _planned_names(found.location, found.doc, len(groups))
        else:
            if found is not None:
                path, names = found.location, _planned_names(found.location, found.doc, len(groups))
            else:
                _refuse_overlapping_plans(dest, sources)
                if not allow_duplicate_keys:
                    _refuse_duplicate_keys(dest, digest, groups)
                if classes is not None:
                    from .labels import save_classes

                    save_classes(dest, classes)
                record_plan_keys(dest, digest, [[s.key for s in group] for group in groups])
                names, path = dest.reserve_plan(digest, prefix, len(groups), lambda names: {**_plan_doc(
                    digest, sources, groups, names, prefix, maxcount, maxsize), **(options or {})})
            try:
                release = dest.hold_plan(digest, shared=shared)
            except PlanBusy:
                running = "a pack of the same inputs without --tasks is" if shared else \
                    "another pack (or array tasks, --tasks) of the same inputs is"
                raise PackError(f"{dest.url}: {running} running (plan {path})") from None
    try:
        tasks = tuple(Task(i, name, tuple(group)) for i, (name, group) in enumerate(zip(names, groups)))
        yield Plan(dest.url, digest, path, tasks, committed=release is None, dest=dest)
    finally:
        if release is not None:
            release()


def _planned_names(path: str, doc: dict, ntasks: int) -> list[str]:
    names = [t["shard"] for t in doc["tasks"]]
    if len(names) != ntasks:
        raise PackError(f"{path}: plan has {len(names)} shards, these inputs make {ntasks}; "
                        "the plan is damaged: remove it to abandon that pack")
    return names


def _plan_doc(digest: str, sources: Sequence[str], groups: Sequence[Sequence[Sample]], names: Sequence[str],
              prefix: str, maxcount: int, maxsize: int) -> dict:
    tasks = [Task(i, name, tuple(group)) for i, (name, group) in enumerate(zip(names, groups))]
    return {
        "version": PLAN_VERSION,
        "hash": digest,
        "sources": _real_sources(sources),
        "prefix": prefix,
        "maxcount": maxcount,
        "maxsize": maxsize,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tasks": [{"shard": t.shard, "nsamples": len(t.samples), "filesize": t.size,
                   "first_key": t.samples[0].key, "last_key": t.samples[-1].key} for t in tasks],
    }


def _refuse_overlapping_plans(dest: Destination, sources: Sequence[str]) -> None:
    mine = _real_sources(sources)
    for other, doc in dest.unfinished_plans().values():
        theirs = doc.get("sources", [])
        if any(paths_overlap(a, b) for a in mine for b in theirs):
            raise PackError(
                f"{dest.url}: an unfinished pack of {', '.join(theirs)} is there (plan {other}), made from other "
                "inputs or options than these: packing now would pack its finished shards' inputs again. "
                "Rerun it with the inputs and options it was made with to finish it, or remove the plan "
                "file to abandon it (the shards it finished stay and are listed by the next pack)")


def _refuse_duplicate_keys(dest: Destination, digest: str, groups: Sequence[Sequence[Sample]]) -> None:
    found = duplicate_keys(dest, (s.key for group in groups for s in group), own_plan=digest)
    if not found:
        return
    shown = ", ".join(f"{key!r} (in {shard})" for key, shard in found[:5])
    message = (f"{dest.url}: {len(found)} of the keys being packed are in its shards already, e.g. {shown}; "
               "packing them again would make readers yield those samples twice. Nothing was written. "
               "Pack other inputs, or pass --allow-duplicate-keys (allow_duplicate_keys=True) if that is meant")
    raise DuplicateKeysError(message)  # the message is the warning: the command prints it once


def run_task(out: str | Destination, digest: str, task: Task, progress: Callable[[int], None] | None = None,
             ) -> ManifestEntry:
    """Publishes the task's shard under its reserved name, then its fragment; returns its
    entry. Idempotent: a finished task is not redone; a shard already published under the
    name (by a killed run of this plan) is kept if it holds exactly the bytes planned (same
    digest), and is never replaced. ``out`` is a directory, an ``s3://`` URL or a
    ``destination.Destination``."""
    dest = open_destination(out)
    done = dest.load_fragment(digest, task.index)
    if done:
        return done[0]
    written = write_shard(task.samples, dest.temporary(digest, task.index), progress)
    entry = dest.publish(written.tmp_path, written.entry(task.shard))  # None: the name exists
    if entry is None:
        entry = _existing_entry(dest, task, written.digest)
    dest.write_fragment(digest, task.index, [entry])
    return entry


def _existing_entry(dest: Destination, task: Task, planned_digest: str) -> ManifestEntry:
    """The entry of a shard found under a task's reserved name, if it is the planned one."""
    path = dest.location(task.shard)
    try:
        entry, complete = dest.indexed(task.shard)
    except TarError as exn:
        entry, complete, why = None, False, str(exn)
    if entry is not None:
        why = f"{entry.nsamples} samples, {entry.filesize} bytes{'' if complete else ', incomplete'}"
        if complete and entry.digest == planned_digest:
            return entry
    raise PackError(f"{path}: reserved for {len(task.samples)} samples in {task.size} bytes by this pack's "
                    f"plan, but holds something else ({why}); not listing it")


def _run_tasks(plan: Plan, todo: Sequence[Task], jobs: int, engine: str = "local") -> None:
    from .engines import run_tasks
    from .progress import PackProgress

    with PackProgress(sum(t.size for t in todo), sum(len(t.samples) for t in todo)) as progress:
        # the destination, not its URL: it carries the storage options to every engine's workers
        run_tasks(engine, functools.partial(run_task, plan.destination, plan.hash), todo, jobs, progress)


@dataclass(frozen=True)
class PackReport:
    """What ``run_pack`` did."""

    entries: list[ManifestEntry]  # the pack's shards as listed (an array task that did not commit: its share)
    written: int  # shards written by this call
    earlier: int  # shards (of this call's share) an earlier, interrupted run had written
    committed_before: bool  # the same pack was done already: nothing was written
    plan: str  # the plan file
    strays: tuple[str, ...] = ()  # files skipped because they belong to no sample (no extension)
    pending: int = 0  # an array task's: the plan's shards other tasks have still to write (no commit yet)

    @property
    def nsamples(self) -> int:
        return sum(e.nsamples or 0 for e in self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.filesize or 0 for e in self.entries)


def run_pack(
    sources: Sequence[str] | str,
    out: str | Destination,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int | str = DEFAULT_MAXSIZE,
    prefix: str = DEFAULT_PREFIX,
    jobs: int = 1,
    follow_symlinks: bool = False,
    storage_options: dict | None = None,
    *,
    shuffle: int | None = None,
    label_from_dir: bool = False,
    exclude: Sequence[str] = (),
    strict: bool = False,
    allow_duplicate_keys: bool = False,
    engine: str = "local",
    tasks: int = 1,
    task_index: int = 0,
) -> PackReport:
    """Packs the files under ``sources`` into new shards in ``out``; says what it did
    (``wr.pack``).

    ``out`` is a local directory or an ``s3://bucket/prefix/`` URL (``storage_options`` as
    ``storage/objects/s3.Store`` takes them; by default the AWS chain and ``AWS_ENDPOINT_URL``).
    Bad input or options raise PackError (or ValueError) before anything is written; so do
    keys that ``out``'s shards hold already (DuplicateKeysError), unless
    ``allow_duplicate_keys``. After a failure or a kill, the same call finishes the same pack;
    once it is finished, the same call does nothing (see the module docstring).

    - ``shuffle``: a seed; samples are spread over the shards in an order that is a pure
      function of the keys and the seed (the same seed packs the same bytes);
    - ``label_from_dir``: each sample gets a ``.cls`` member, its top folder's number in
      sorted order of the folder names, recorded in ``out/classes.json`` (``labels.py``);
    - ``exclude``: globs matched against names relative to their source and base names;
    - ``strict``: a file that belongs to no sample (no extension) is an error; otherwise it is
      skipped with a warning and listed in the report's ``strays``;
    - ``engine``: ``"local"`` runs ``jobs`` shards at once, each in its own process;
      ``"ray"`` runs them as Ray tasks (``engines.py``); both write to ``out`` with
      ``storage_options``;
    - ``tasks``, ``task_index``: an array job's share: only the plan's tasks whose index is
      ``task_index`` modulo ``tasks``; every array task makes or finds the same plan, and the
      one that finds every task of the plan finished commits it.
    """
    sources = [sources] if isinstance(sources, str) else list(sources)
    check_prefix(prefix)
    check_destination(out)
    _check_counts(jobs, tasks, task_index, engine)
    maxsize = parse_size(maxsize)
    try:
        dest = open_destination(out, storage_options)
    except DestinationError as exn:
        raise PackError(str(exn)) from None
    strays: list[str] | None = None if strict else []
    samples = collect(sources, follow_symlinks, exclude, strays)
    if strays:
        log.warning("skipped %d files that belong to no sample (no extension; --strict makes them errors): %s%s",
                    len(strays), ", ".join(strays[:3]), ", ..." if len(strays) > 3 else "")
    dest.prepare()
    options: dict = {}
    classes = None
    if label_from_dir:
        from .labels import folder_classes, labelled, numbering

        classes = numbering(dest, folder_classes(samples))
        samples = labelled(samples, classes)
        options["label_from_dir"] = True
    if shuffle is not None:
        samples = shuffled(samples, shuffle)
        options["shuffle"] = shuffle
    groups = plan_shards(samples, maxcount, maxsize)
    with open_plan(dest, sources, groups, prefix, maxcount, maxsize, options=options, shared=tasks > 1,
                   allow_duplicate_keys=allow_duplicate_keys, classes=classes) as plan:
        strays_found = tuple(strays or ())
        if plan.committed:
            entries = _listed_entries(plan, plan.tasks)
            log.warning("%s: these inputs were packed there before (%s to %s); nothing to do. To pack them "
                        "again, remove %s and allow duplicate keys", dest.url, plan.tasks[0].shard,
                        plan.tasks[-1].shard, plan.path)
            return PackReport(entries, 0, 0, True, plan.path, strays_found)
        share = [t for t in plan.tasks if t.index % tasks == task_index]
        if tasks == 1:  # array tasks may be writing: the one that commits sweeps
            dest.sweep(plan.hash, [t.shard for t in plan.tasks])
        unfinished = {t.index for t in plan.unfinished()}
        todo = [t for t in share if t.index in unfinished]
        if len(todo) < len(share):
            log.warning("%s: finishing an unfinished pack of the same inputs: %d of %d shards were written "
                        "before (plan %s)", dest.url, len(share) - len(todo), len(share), plan.path)
        _run_tasks(plan, todo, jobs, engine)
        report = functools.partial(PackReport, written=len(todo), earlier=len(share) - len(todo),
                                   committed_before=False, strays=strays_found)
        if tasks > 1:
            pending = len(plan.unfinished())
            if pending:
                log.info("task %d of %d: %d shards of the plan left to other tasks", task_index, tasks, pending)
                return report(_listed_entries(plan, share), plan=plan.path, pending=pending)
            dest.sweep(plan.hash, [t.shard for t in plan.tasks])
        dest.commit(plan.hash)  # (two array tasks finishing at once both commit: the second finds it done)
        entries = _listed_entries(plan, plan.tasks)
    if [e.url for e in entries] != [t.shard for t in plan.tasks]:
        raise RuntimeError(f"{dest.url}: committed {len(entries)} of the plan's {len(plan.tasks)} shards")
    log.info("packed %d samples into %d shards in %s", len(samples), len(entries), dest.url)
    return report(entries, plan=dest.done_location(plan.hash))


def _check_counts(jobs: int, tasks: int, task_index: int, engine: str) -> None:
    from .engines import ENGINES

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (expected one of: {', '.join(ENGINES)})")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1 (got {jobs})")
    if tasks < 1:
        raise ValueError(f"tasks must be at least 1 (got {tasks})")
    if not 0 <= task_index < tasks:
        raise ValueError(f"task index must be from 0 to {tasks - 1} for {tasks} tasks (got {task_index})")


def _listed_entries(plan: Plan, tasks: Sequence[Task]) -> list[ManifestEntry]:
    """The entries of ``tasks``' shards in the manifest or the fragments (committed or not)."""
    dest = plan.destination
    by_url = {e.url: e for e in dest.fragment_entries() + dest.manifest_entries()}
    return [by_url[t.shard] for t in tasks if t.shard in by_url]


def pack_entries(
    sources: Sequence[str] | str,
    out: str | Destination,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int | str = DEFAULT_MAXSIZE,
    prefix: str = DEFAULT_PREFIX,
    jobs: int = 1,
    follow_symlinks: bool = False,
    storage_options: dict | None = None,
    **options,
) -> list[ManifestEntry]:
    """Packs the files under ``sources`` into new shards in ``out`` (a directory or an
    ``s3://`` URL); returns the entries of the pack's shards. ``run_pack`` (which this calls,
    passing ``options`` on) says more."""
    return run_pack(sources, out, maxcount, maxsize, prefix, jobs, follow_symlinks, storage_options,
                    **options).entries
