"""``wdsrefresh verify | ls`` of an object-store prefix (``s3://bucket/prefix/``).

The same checks and rows as ``verify.py`` for a directory: the shards are the shard-named
objects directly under the prefix (as readers list them); what they should be comes from
``manifest.json``, then from the fragments of packs not yet committed (``manifest.d/``).
``verify`` re-reads every object once through the remote reader (pinned to the listed ETag)
and compares size, ETag, digests, block digests, sample count and tar structure; ``ls`` reads
no object, only the listing, the manifest and the fragments, and marks an object whose size or
ETag differs from its entry as replaced.
"""

from __future__ import annotations

import posixpath
import time
from concurrent.futures import ThreadPoolExecutor

from ..format.digest import DEFAULT_ALGO, split_digest
from ..format.manifest import DEFAULT_NAME as MANIFEST_NAME
from ..format.manifest import ManifestEntry
from ..format.names import is_shard_name
from ..format.tario import TarError
from .destination import S3Destination
from .findings import Listing, Problem, Report, index_problems

THREADS = 8  # objects read at once by verify


def _target(url: str, storage_options: dict | None) -> tuple[S3Destination, str | None]:
    """The prefix to look at, and the one shard asked for (if the URL names a shard)."""
    base, _, last = url.rstrip("/").rpartition("/") if not url.endswith("/") else (url, "", "")
    if last and is_shard_name(last):
        return S3Destination(base + "/", storage_options), last
    if last == MANIFEST_NAME:
        return S3Destination(base + "/", storage_options), None
    return S3Destination(url, storage_options), None


def _entries(dest: S3Destination, shard: str | None) -> tuple[list[ManifestEntry], set[str], list[str], bool, dict]:
    """Entries to check (manifest's, then fragments'), the urls of the fragments' ones, the
    objects none lists, whether there is a manifest, and the listing."""
    stats = dest.shard_objects()
    manifest = dest.manifest()
    entries = list(manifest or [])
    listed = {e.url for e in entries}
    pending = set()
    for e in dest.fragment_entries():
        if e.url not in listed:
            listed.add(e.url)
            pending.add(e.url)
            entries.append(e)
    unlisted = [n for n in stats if n not in listed]
    if shard is not None:
        entries = [e for e in entries if e.url == shard]
        unlisted = [] if entries else [shard]
    return entries, pending, unlisted, manifest is not None, stats


def _check_object(dest: S3Destination, stat, entry: ManifestEntry) -> tuple[list[Problem], int]:
    from ..storage.objects import ObjectChangedError, ObjectVanishedError, index_object, same_etag

    url = entry.url
    if stat is None:
        return [Problem(url, "missing", f"{dest.location(url)} does not exist")], 0
    problems = []
    if entry.filesize is not None and stat.size != entry.filesize:
        problems.append(Problem(url, "size", f"{stat.size} bytes, manifest says {entry.filesize}"))
    if entry.etag is not None and not same_etag(entry.etag, stat.etag):
        problems.append(Problem(url, "etag", f"ETag {stat.etag}, manifest says {entry.etag} (replaced since)"))
    algo = split_digest(entry.digest)[0] if entry.digest else DEFAULT_ALGO
    try:
        index = index_object(dest.store, stat, algo)
    except (ObjectChangedError, ObjectVanishedError) as exn:
        return problems + [Problem(url, "changed", f"changed while it was read: {exn}")], 0
    except TarError as exn:
        return problems + [Problem(url, "tar", str(exn))], 0
    return problems + index_problems(entry, index, stat.size), index.nsamples


def check_remote(url: str, storage_options: dict | None = None) -> Report:
    """``verify.check`` for an ``s3://`` prefix, manifest or shard URL."""
    dest, shard = _target(url, storage_options)
    entries, pending, unlisted, has_manifest, stats = _entries(dest, shard)
    jobs = [(stats.get(e.url), e) for e in entries] + [(stats.get(n), ManifestEntry(n)) for n in unlisted]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda job: _check_object(dest, *job), jobs))
    problems = [Problem(n, "unlisted", f"not in {MANIFEST_NAME}") for n in unlisted] if has_manifest else []
    for found, _ in results:
        problems += found
    if not jobs:
        problems.append(Problem(url, "empty", "no shards found, so nothing was verified"))
    manifest = dest.location(MANIFEST_NAME) if has_manifest or pending else None
    undigested = sum(1 for e in entries if not e.digest)
    return Report(url, manifest, len(jobs), sum(n for _, n in results), undigested, len(pending), problems)


def listing_remote(url: str, storage_options: dict | None = None) -> list[Listing]:
    """``verify.listing`` for an ``s3://`` prefix or shard: counts and digests from the manifest
    and fragments, sizes and ages (since Last-Modified) from the listing; objects neither lists
    have no count (``verify`` reads them)."""
    from ..storage.objects import same_etag

    dest, shard = _target(url, storage_options)
    entries, pending, unlisted, _, stats = _entries(dest, shard)
    now = time.time()

    def row(entry: ManifestEntry, listed: bool) -> Listing:
        stat = stats.get(entry.url)
        if stat is None:
            return Listing(entry.url, entry.nsamples, None, entry.digest, None, listed, entry.url in pending)
        replaced = (entry.filesize is not None and stat.size != entry.filesize) or \
            (entry.etag is not None and not same_etag(entry.etag, stat.etag))
        return Listing(posixpath.basename(entry.url), entry.nsamples, stat.size, entry.digest,
                       now - stat.mtime_ns / 1e9, listed, entry.url in pending, replaced)

    return [row(e, True) for e in entries] + [row(ManifestEntry(n), False) for n in unlisted]
