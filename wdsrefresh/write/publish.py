"""Publishing shards into a directory: numbering, renaming into place, updating the manifest.

Layout of an output directory ``OUT`` (what readers may rely on):

    OUT/PREFIX-NNNNNN.tar              published shards: complete, never replaced
    OUT/manifest.json                  the committed manifest (wids shard index v1 + digests)
    OUT/manifest.d/part-<plan16>-<task 5 digits>.json
                                       manifest fragments of a pack not yet committed: each a
                                       wids-shaped document whose ``shardlist`` holds the
                                       entries of shards already renamed into place, plus
                                       ``"plan"`` (the plan's hash) and ``"task"``
    OUT/.wdsrefresh/plans/plan-<hash>.json
                                       a pack plan: the shard names it reserves
    OUT/.wdsrefresh/plans/done-<hash>.json
                                       the same, once committed: a rerun of that pack is a no-op
    OUT/.wdsrefresh/ingest-<tag>/      ingest journals
    OUT/.wdsrefresh.lock               the directory lock

A shard is listed by ``manifest.json`` or by exactly one fragment, or by both for the
moment between a commit's manifest write and its removal of the fragments: the shard list
of ``OUT`` is ``manifest.json``'s entries, then those of the fragments (in name order) whose
url is not listed yet. Files in ``manifest.d/`` whose names start with '.' or '_tmp' are
being written: not fragments.

Every step that numbers shards or rewrites the manifest holds an exclusive lock on ``OUT``
(``out_lock``), so packs and ingests into one directory never take the same shard number; a
plan's reservation counts as taken until the plan is committed. A published name is never
replaced (``rename_without_replacing``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from collections.abc import Container, Iterable, Iterator, Sequence
from contextlib import contextmanager

from ..format import manifest as manifestmod
from ..format.manifest import FRAGMENTS_DIR, fragment_paths
from ..format.atomic import fsync_dir, unlink_quietly
from ..format.manifest import ManifestEntry
from ..format.names import is_shard_name
from ..format.tario import index_shard

MANIFEST_NAME = manifestmod.DEFAULT_NAME
LOCK_NAME = ".wdsrefresh.lock"
PRIVATE_DIR = ".wdsrefresh"
PLANS_DIR = os.path.join(PRIVATE_DIR, "plans")
_PLAN_RE = re.compile(r"plan-([0-9a-f]+)\.json$")


def named(exn: OSError, path: str) -> OSError:
    """``exn`` again, naming ``path`` when it names no file (fsync, write and close errors)."""
    if exn.filename is not None:
        return exn
    return type(exn)(exn.errno, exn.strerror, path)


@contextmanager
def out_lock(out: str) -> Iterator[None]:
    """Exclusive lock on the output directory, for numbering shards and updating the manifest."""
    path = os.path.join(out, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def fsync_dir_named(directory: str) -> None:
    try:
        fsync_dir(directory)
    except OSError as exn:
        raise named(exn, directory) from None


# ---- plans: reservations of shard names --------------------------------------------------


def plans_dir(out: str) -> str:
    return os.path.join(out, PLANS_DIR)


def plan_path(out: str, plan_hash: str) -> str:
    return os.path.join(plans_dir(out), f"plan-{plan_hash}.json")


def done_path(out: str, plan_hash: str) -> str:
    """Where a plan goes once committed."""
    return os.path.join(plans_dir(out), f"done-{plan_hash}.json")


def plan_paths(out: str) -> dict[str, str]:
    """``{plan hash: path}`` of the plans in ``out`` (uncommitted packs)."""
    try:
        names = os.listdir(plans_dir(out))
    except FileNotFoundError:
        return {}
    return {m.group(1): os.path.join(plans_dir(out), n) for n in names if (m := _PLAN_RE.match(n))}


def load_plan(path: str) -> dict:
    """The plan document at ``path``; ValueError naming it when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"{path}: damaged pack plan ({exn}); remove it to abandon that pack") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        raise ValueError(f"{path}: not a pack plan (no 'tasks' list); remove it to abandon that pack")
    return doc


def reserved_names(out: str) -> set[str]:
    """Shard names reserved by the plans in ``out`` (renamed into place or not yet)."""
    names = set()
    for path in plan_paths(out).values():
        try:
            doc = load_plan(path)
        except FileNotFoundError:
            continue  # committed meanwhile: its shards are in the manifest now
        names.update(task["shard"] for task in doc["tasks"])
    return names


def create_plan(out: str, plan_hash: str, doc: dict) -> str:
    """Writes the plan file durably with an exclusive create; FileExistsError if it exists.

    The file appears whole or not at all (written under a hidden name, then hard-linked to
    its name, which fails if the name exists). Call with ``out_lock`` held.
    """
    directory = plans_dir(out)
    os.makedirs(directory, exist_ok=True)
    path = plan_path(out, plan_hash)
    tmp = os.path.join(directory, f".plan-{plan_hash}.{os.getpid()}.tmp")
    _write_durably(tmp, json.dumps(doc, indent=1).encode())
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    fsync_dir_named(directory)
    return path


def sweep_plan_temporaries(out: str) -> None:
    """Removes plan files left half-written by a killed pack. Call with ``out_lock`` held
    (plans are only written under it)."""
    directory = plans_dir(out)
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(".plan-") and name.endswith(".tmp"):
                os.unlink(os.path.join(directory, name))


# ---- fragments: manifest entries of a pack not yet committed -----------------------------


def fragments_dir(out: str) -> str:
    return os.path.join(out, FRAGMENTS_DIR)


def fragment_path(out: str, plan_hash: str, task: int) -> str:
    return os.path.join(fragments_dir(out), f"part-{plan_hash[:16]}-{task:05d}.json")


def write_fragment(out: str, plan_hash: str, task: int, entries: Sequence[ManifestEntry]) -> str:
    """Writes a task's fragment durably and atomically (hidden temporary name, fsync, rename)."""
    path = fragment_path(out, plan_hash, task)
    doc = {
        "__kind__": manifestmod.KIND,
        "wids_version": 1,
        "name": os.path.basename(os.path.abspath(out)),
        "plan": plan_hash,
        "task": task,
        "shardlist": [e.to_json() for e in entries],
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".part-{plan_hash[:16]}-{task:05d}.{os.getpid()}.tmp")
    _write_durably(tmp, json.dumps(doc, indent=1).encode())
    os.replace(tmp, path)
    fsync_dir_named(os.path.dirname(path))
    return path


def load_fragment(path: str) -> tuple[str | None, list[ManifestEntry]]:
    """``(plan hash, entries)`` of a fragment."""
    entries = manifestmod.load(path)
    with open(path, encoding="utf-8") as f:
        plan = json.load(f).get("plan")
    return plan, entries


def fragment_entries(out: str) -> list[ManifestEntry]:
    """Entries of every fragment in ``out`` (shards of packs not yet committed), in order."""
    entries: list[ManifestEntry] = []
    for path in fragment_paths(out):
        try:
            entries += manifestmod.load(path)
        except FileNotFoundError:
            continue  # committed meanwhile
    return entries


def sweep_task_temporaries(out: str, plan_hash: str) -> None:
    """Removes the temporary files of a plan's killed tasks. Call holding the plan's lock."""
    tag = plan_hash[:16]
    for directory, start in ((out, f".pack-{tag}-"), (fragments_dir(out), f".part-{tag}-")):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            if name.startswith(start) and name.endswith(".tmp"):
                unlink_quietly(os.path.join(directory, name))


# ---- numbering, renaming, the manifest ---------------------------------------------------


def manifest_entries(out: str) -> list[ManifestEntry]:
    """The entries of ``out/manifest.json``, or none without it."""
    path = os.path.join(out, MANIFEST_NAME)
    try:
        return manifestmod.load(path)
    except FileNotFoundError:
        return []


def current_entries(out: str) -> list[ManifestEntry]:
    """The manifest's entries; without a manifest, the shards already in ``out``, indexed
    (except those reserved by an uncommitted plan: its commit lists them)."""
    path = os.path.join(out, MANIFEST_NAME)
    if os.path.exists(path):
        return manifestmod.load(path)
    reserved = reserved_names(out)
    names = sorted(n for n in os.listdir(out)
                   if is_shard_name(n) and n not in reserved and os.path.isfile(os.path.join(out, n)))
    entries = []
    for name in names:
        st = os.stat(os.path.join(out, name))
        index = index_shard(os.path.join(out, name), url=name)
        entries.append(ManifestEntry(name, index.nsamples, st.st_size, index.digest, index.blocks, st.st_mtime_ns))
    return entries


def journaled_names(out: str) -> list[str]:
    """Shard names an ingest journaled and has not finished publishing (``<shard>.json``)."""
    private = os.path.join(out, PRIVATE_DIR)
    try:
        dirs = [d for d in os.listdir(private) if d.startswith("ingest-")]
    except FileNotFoundError:
        return []
    names = []
    for d in dirs:
        try:
            names += [n[: -len(".json")] for n in os.listdir(os.path.join(private, d)) if n.endswith(".json")]
        except (FileNotFoundError, NotADirectoryError):
            continue
    return names


def next_number(out: str, prefix: str, names: Iterable[str] = ()) -> int:
    """One more than the highest ``PREFIX-N.tar`` in ``out``, its manifest, its fragments,
    its plans' reservations, the ingest journals, or ``names``."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)\.tar(?:\.gz)?$")
    taken = [*os.listdir(out), *names, *reserved_names(out), *journaled_names(out)]
    taken += [os.path.basename(e.url) for e in manifest_entries(out) + fragment_entries(out)]
    numbers = [int(m.group(1)) for m in map(pattern.match, taken) if m]
    return max(numbers, default=-1) + 1


def rename_without_replacing(tmp_path: str, final_path: str) -> None:
    """Renames without ever replacing an existing file: FileExistsError if ``final_path``
    exists, even when another process publishes it at the same moment."""
    try:
        os.link(tmp_path, final_path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "already exists; refusing to replace a published shard",
                              final_path) from None
    except OSError as exn:
        if exn.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # no hard links on this file system: check, then rename (callers hold a lock)
        if os.path.lexists(final_path):
            raise FileExistsError(errno.EEXIST, "already exists; refusing to replace a published shard",
                                  final_path) from None
        os.rename(tmp_path, final_path)
        return
    os.unlink(tmp_path)


def add_to_manifest(out: str, entries: list[ManifestEntry], new: Sequence[ManifestEntry]) -> None:
    """Rewrites the manifest atomically as ``entries`` plus the ``new`` ones not yet listed."""
    listed = {e.url for e in entries}
    manifestmod.save(os.path.join(out, MANIFEST_NAME), entries + [e for e in new if e.url not in listed])


def commit(out: str, plan_hash: str) -> list[ManifestEntry]:
    """Merges a plan's fragments into the manifest, removes them, and marks the plan done.

    Fragments whose plan is gone (left by a pack committed or abandoned meanwhile) are merged
    too. No shard is ever listed twice. Returns the manifest entries of the plan's shards.
    """
    with out_lock(out):
        plans = plan_paths(out)
        mine = reserved_names_of(plans.get(plan_hash))
        entries = current_entries(out)
        fragments = ((path, *load_fragment(path)) for path in fragment_paths(out))
        merged, new = merge_fragments(entries, fragments, plan_hash, plans)
        if new or not os.path.exists(os.path.join(out, MANIFEST_NAME)):
            manifestmod.save(os.path.join(out, MANIFEST_NAME), entries + new)
        for path in merged:
            os.unlink(path)
        if merged:
            fsync_dir_named(fragments_dir(out))
        if plan_hash in plans:
            os.replace(plans[plan_hash], done_path(out, plan_hash))
            fsync_dir_named(plans_dir(out))
        by_url = {e.url: e for e in entries + new}
    return [by_url[name] for name in mine if name in by_url]


def merge_fragments(entries: Sequence[ManifestEntry],
                    fragments: Iterable[tuple[str, str | None, Sequence[ManifestEntry]]], plan_hash: str | None,
                    running: Container[str]) -> tuple[list[str], list[ManifestEntry]]:
    """What a commit of ``plan_hash`` merges: the fragments (``(where, owner plan, entries)``)
    it takes, all but those of other plans still ``running`` (each commits its own), and the
    entries they add to ``entries`` (none listed twice)."""
    listed = {e.url for e in entries}
    merged, new = [], []
    for where, owner, frag in fragments:
        if owner != plan_hash and owner in running:
            continue
        merged.append(where)
        for e in frag:
            if e.url not in listed:
                listed.add(e.url)
                new.append(e)
    return merged, new


def reserved_names_of(path: str | None) -> list[str]:
    return [task["shard"] for task in load_plan(path)["tasks"]] if path else []


def _write_durably(path: str, data: bytes) -> None:
    try:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exn:
        unlink_quietly(path)
        raise named(exn, path) from None

