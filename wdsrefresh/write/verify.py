"""Checking and listing a shard directory against its manifest (``wdsrefresh verify | ls``).

``verify`` reads every shard once: it re-hashes it (whole-file and block digests), counts
its samples and walks its tar structure, and compares all of that with the manifest. It
reports problems; it never changes a file. Without a manifest, the walk of every shard's
tar structure is the check. Shards of a pack not yet committed are checked against their
entries in ``manifest.d/`` (see ``publish.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

from ..format import manifest as manifestmod
from ..format.digest import DEFAULT_ALGO, split_digest
from ..format.manifest import DEFAULT_NAME as MANIFEST_NAME
from ..format.manifest import ManifestEntry
from ..format.names import SHARD_PATTERNS, is_shard_name
from ..format.tario import TarError, index_shard
from ..storage.backend import backend_for
from .findings import Listing, Problem, Report, index_problems
from .publish import fragment_entries, reserved_names



@dataclass(frozen=True)
class _Target:
    directory: str
    manifest: str | None
    shard: str | None  # a single shard file given as the target


def resolve(target: str) -> tuple[str, str | None]:
    """``(directory, manifest path or None)`` for a directory, a manifest or a shard file."""
    t = _resolve(target)
    return t.directory, t.manifest


def _resolve(target: str) -> _Target:
    if os.path.isdir(target):
        path = os.path.join(target, MANIFEST_NAME)
        return _Target(target, path if os.path.exists(path) else None, None)
    if os.path.isfile(target):
        directory = os.path.dirname(os.path.abspath(target))
        if is_shard_name(target):
            beside = os.path.join(directory, MANIFEST_NAME)
            return _Target(directory, beside if os.path.exists(beside) else None, os.path.basename(target))
        return _Target(directory, target, None)
    raise FileNotFoundError(f"{target} does not exist (give a shard directory, a manifest or a shard file)")


def _load_manifest(path: str) -> list[ManifestEntry]:
    try:
        with open(path, encoding="utf-8") as f:
            f.read(1 << 16)
    except UnicodeDecodeError:
        raise manifestmod.ManifestError(
            f"{path}: not a manifest (not UTF-8 JSON text), nor a shard (names: {', '.join(SHARD_PATTERNS)})") from None
    return manifestmod.load(path)


def _entries(t: _Target) -> tuple[list[ManifestEntry], set[str], list[str]]:
    """Entries to check (the manifest's, then those of a pack not committed yet: from
    manifest.d/, or only a url for a shard renamed into place before its fragment was
    written), the urls of the latter, and the shard files in the directory none lists."""
    entries = _load_manifest(t.manifest) if t.manifest else []
    listed = {os.path.normpath(e.url) for e in entries}
    pending = set()
    if t.manifest is None or os.path.basename(t.manifest) == MANIFEST_NAME:
        found = fragment_entries(t.directory)
        reserved = reserved_names(t.directory)
        found += [ManifestEntry(n) for n in sorted(reserved) if os.path.isfile(os.path.join(t.directory, n))]
        for e in found:
            if os.path.normpath(e.url) not in listed:
                listed.add(os.path.normpath(e.url))
                pending.add(e.url)
                entries.append(e)
    if t.shard is not None:
        entries = [e for e in entries if os.path.normpath(e.url) == t.shard]
        return entries, pending, [] if entries else [t.shard]
    names = sorted(n for n in os.listdir(t.directory) if is_shard_name(n) and n not in listed)
    return entries, pending, [n for n in names if os.path.isfile(os.path.join(t.directory, n))]


def _path(directory: str, url: str) -> str:
    return url if os.path.isabs(url) else os.path.join(directory, url)


def check_shard(path: str, entry: ManifestEntry) -> list[Problem]:
    """Problems of one shard against its manifest entry (an entry with only a url checks
    that the shard exists and is a complete tar)."""
    return _check_shard(path, entry)[0]


def _check_shard(path: str, entry: ManifestEntry) -> tuple[list[Problem], int]:
    """Problems, and the number of samples counted."""
    url = entry.url
    if not os.path.isfile(path):
        return [Problem(url, "missing", f"{path} does not exist")], 0
    problems = []
    size = os.path.getsize(path)
    if entry.filesize is not None and size != entry.filesize:
        problems.append(Problem(url, "size", f"{size} bytes, manifest says {entry.filesize}"))
    algo = split_digest(entry.digest)[0] if entry.digest else DEFAULT_ALGO
    try:
        index = index_shard(path, url=url, algo=algo)
    except TarError as exn:
        return problems + [Problem(url, "tar", str(exn))], 0
    return problems + index_problems(entry, index, size), index.nsamples


def check(target: str, storage_options: dict | None = None) -> Report:
    """Checks every shard of ``target`` (a directory, a manifest or one shard file, or an
    ``s3://`` URL of one: ``verify_remote.py``): in manifest order, then shards of
    manifest.d/, then shards present but not listed (a problem when there is a manifest).
    No shard at all is a problem too."""
    if not backend_for(target).local:
        from .verify_remote import check_remote

        return check_remote(target, storage_options)
    t = _resolve(target)
    entries, pending, unlisted = _entries(t)
    problems: list[Problem] = []
    samples = 0
    for entry in entries:
        found, n = _check_shard(_path(t.directory, entry.url), entry)
        problems += found
        samples += n
    for name in unlisted:
        if t.manifest:
            problems.append(Problem(name, "unlisted", f"not in {os.path.basename(t.manifest)}"))
        found, n = _check_shard(os.path.join(t.directory, name), ManifestEntry(name))
        problems += found
        samples += n
    shards = len(entries) + len(unlisted)
    if shards == 0:
        problems.append(Problem(target, "empty", "no shards found, so nothing was verified"))
    undigested = sum(1 for e in entries if not e.digest)
    return Report(target, t.manifest, shards, samples, undigested, len(pending), problems)


def verify(target: str) -> list[Problem]:
    """Every problem found in the shards of ``target`` (see ``check``). Empty means all is well."""
    return check(target).problems


def listing(target: str, storage_options: dict | None = None) -> list[Listing]:
    """One row per shard of ``target``: what the manifest (or manifest.d/) says, with size
    and age from the file system; shards listed by neither are counted by a header walk.
    ``s3://`` URLs are listed by ``verify_remote.py``."""
    if not backend_for(target).local:
        from .verify_remote import listing_remote

        return listing_remote(target, storage_options)
    t = _resolve(target)
    entries, pending, unlisted = _entries(t)
    now = time.time()
    rows = [_row(_path(t.directory, e.url), e, now, listed=True, pending=e.url in pending) for e in entries]
    for name in unlisted:
        path = os.path.join(t.directory, name)
        nsamples, unreadable = _header_walk(path, name)
        rows.append(replace(_row(path, ManifestEntry(name, nsamples), now, listed=False), unreadable=unreadable))
    return rows


def _header_walk(path: str, name: str) -> tuple[int | None, str | None]:
    """(samples, None) for a complete tar; (None, why) for a file no reader would read."""
    try:
        found = index_shard(path, url=name, with_digest=False)
    except TarError as exn:
        return None, str(exn).removeprefix(f"{name}: ")
    except OSError as exn:
        return None, f"cannot be read: {exn.strerror or exn}"
    if not found.complete:
        return None, (f"incomplete: {os.path.getsize(path)} bytes and no end-of-archive marker (its tar data "
                      f"reaches byte {found.end}); a reader waits for its writer, then rejects it as truncated")
    return found.nsamples, None


def _row(path: str, entry: ManifestEntry, now: float, listed: bool, pending: bool = False) -> Listing:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Listing(entry.url, entry.nsamples, None, entry.digest, None, listed, pending)
    replaced = (entry.filesize is not None and st.st_size != entry.filesize) or \
        (entry.mtime_ns is not None and st.st_mtime_ns != entry.mtime_ns)
    return Listing(entry.url, entry.nsamples, st.st_size, entry.digest, now - st.st_mtime, listed, pending, replaced)
