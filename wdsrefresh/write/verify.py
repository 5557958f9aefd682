"""Checking and listing a shard directory against its manifest (``wdsrefresh verify | ls``).

``verify`` reads every shard once: it re-hashes it (whole-file and block digests), counts
its samples and walks its tar structure, and compares all of that with the manifest. It
reports problems; it never changes a file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..format import manifest as manifestmod
from ..format.digest import BLOCK_SIZE, DEFAULT_ALGO, split_digest
from ..format.manifest import DEFAULT_NAME as MANIFEST_NAME
from ..format.manifest import ManifestEntry
from ..format.names import is_shard_name
from ..format.tario import TarError, index_shard


@dataclass(frozen=True)
class Problem:
    shard: str
    kind: str  # missing | size | tar | truncated | digest | blocks | nsamples | unlisted
    detail: str


@dataclass(frozen=True)
class Listing:
    shard: str
    nsamples: int | None
    size: int | None
    digest: str | None
    age: float | None  # seconds since the last modification
    listed: bool  # named in the manifest


def resolve(target: str) -> tuple[str, str | None]:
    """``(directory, manifest path or None)`` for a directory or a manifest file."""
    if os.path.isdir(target):
        path = os.path.join(target, MANIFEST_NAME)
        return target, path if os.path.exists(path) else None
    if os.path.isfile(target):
        return os.path.dirname(os.path.abspath(target)), target
    raise FileNotFoundError(f"{target}: no such directory or manifest")


def _entries(directory: str, manifest: str | None) -> tuple[list[ManifestEntry], list[str]]:
    """Manifest entries plus the shard files in ``directory`` the manifest does not list."""
    entries = manifestmod.load(manifest) if manifest else []
    listed = {os.path.normpath(e.url) for e in entries}
    names = sorted(n for n in os.listdir(directory) if is_shard_name(n) and n not in listed)
    return entries, [n for n in names if os.path.isfile(os.path.join(directory, n))]


def _path(directory: str, url: str) -> str:
    return url if os.path.isabs(url) else os.path.join(directory, url)


def check_shard(path: str, entry: ManifestEntry) -> list[Problem]:
    """Problems of one shard against its manifest entry (an entry with only a url checks
    that the shard exists and is a complete tar)."""
    url = entry.url
    if not os.path.isfile(path):
        return [Problem(url, "missing", f"{path} does not exist")]
    problems = []
    size = os.path.getsize(path)
    if entry.filesize is not None and size != entry.filesize:
        problems.append(Problem(url, "size", f"{size} bytes, manifest says {entry.filesize}"))
    algo = split_digest(entry.digest)[0] if entry.digest else DEFAULT_ALGO
    try:
        index = index_shard(path, url=url, algo=algo)
    except TarError as exn:
        return problems + [Problem(url, "tar", str(exn))]
    if not index.complete:
        problems.append(Problem(url, "truncated", f"ends before its end-of-archive marker ({size} bytes)"))
    if index.digest is not None:
        problems += _digest_problems(entry, index.digest, index.blocks)
    if entry.nsamples is not None and index.complete and index.nsamples != entry.nsamples:
        problems.append(Problem(url, "nsamples", f"{index.nsamples} samples, manifest says {entry.nsamples}"))
    return problems


def _digest_problems(entry: ManifestEntry, digest: str, blocks: bytes | None) -> list[Problem]:
    problems = []
    if entry.digest and digest != entry.digest.lower():
        problems.append(Problem(entry.url, "digest", f"{digest}, manifest says {entry.digest}"))
    if entry.blocks is not None and blocks is not None and blocks != entry.blocks:
        problems.append(Problem(entry.url, "blocks", f"first differing block at byte {_first_difference(blocks, entry.blocks)}"))
    return problems


def _first_difference(a: bytes, b: bytes) -> int:
    for i in range(0, max(len(a), len(b)), 8):
        if a[i : i + 8] != b[i : i + 8]:
            return (i // 8) * BLOCK_SIZE
    return 0


def verify(target: str) -> list[Problem]:
    """Every problem found in the shards of ``target`` (a directory or a manifest), in
    manifest order, then shards present but not listed. Empty means all is well."""
    directory, manifest = resolve(target)
    entries, unlisted = _entries(directory, manifest)
    problems = []
    for entry in entries:
        problems += check_shard(_path(directory, entry.url), entry)
    for name in unlisted:
        if manifest:
            problems.append(Problem(name, "unlisted", f"not in {os.path.basename(manifest)}"))
        problems += check_shard(os.path.join(directory, name), ManifestEntry(name))
    return problems


def listing(target: str) -> list[Listing]:
    """One row per shard of ``target``: what the manifest says, with size and age from the
    file system; shards not in the manifest are counted by a header walk."""
    directory, manifest = resolve(target)
    entries, unlisted = _entries(directory, manifest)
    now = time.time()
    rows = [_row(_path(directory, e.url), e, now, listed=True) for e in entries]
    for name in unlisted:
        path = os.path.join(directory, name)
        try:
            nsamples: int | None = index_shard(path, url=name, with_digest=False).nsamples
        except TarError:
            nsamples = None
        rows.append(_row(path, ManifestEntry(name, nsamples), now, listed=False))
    return rows


def _row(path: str, entry: ManifestEntry, now: float, listed: bool) -> Listing:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Listing(entry.url, entry.nsamples, None, entry.digest, None, listed)
    return Listing(entry.url, entry.nsamples, st.st_size, entry.digest, now - st.st_mtime, listed)
