"""ObjectSource: shards named by ``s3://`` URLs, listed afresh at every epoch.

Forms, with the names rules of a directory (``_tmp*``, ``*.tmp``, ``*.part``, hidden names and
non-shard names are never listed):

- ``s3://bucket/prefix/``: every shard-named object directly under the prefix (as a directory
  is read: not below a further ``/``); its ``manifest.json``, when there is one, gives counts
  and digests for the objects its entries describe, and so do the fragments of packs not yet
  committed (``manifest.d/part-*.json``), listed only when there are some and some object is
  not described;
- ``s3://bucket/prefix/*.tar``: a glob (``*`` and ``?`` stay within one ``/`` level, ``**``
  crosses levels); ``s3://bucket/shard-{000..099}.tar``: a brace pattern (objects that do not
  exist are left out); ``s3://bucket/one.tar``: one object;
- ``s3://bucket/prefix/manifest.json``: a manifest, whose urls are relative to its prefix or
  absolute ``s3://`` URLs; it is fetched again only when its ETag changed (``If-None-Match``);
- a list of any of these (listed once per parent prefix, in the order given).

``https://`` (and ``http://``) URLs name shards on a web server (``http_store.py``): a brace
pattern or list of shard URLs (one HEAD each per epoch: HTTP has no listing), or a manifest URL
whose urls are relative to it or absolute ``http(s)://`` URLs. A manifest entry that records
``filesize`` and a strong ``etag`` is taken without a HEAD: reads are pinned to that ETag, so an
entry the shard no longer matches is caught at its first read (412: ``on_change``; 404: deleted).

Each listing costs one paginated ListObjectsV2 per prefix. An object is ready once listed:
a PUT or a completed multipart upload is visible whole or not at all. What it holds (count,
digest, block digests) comes from a manifest entry that describes this version (same size
and ETag), or from indexing it once (one streamed, pinned read, in a thread pool of the
resolving process); either is kept in memory by (URL, ETag) while the object is listed, so an
epoch costs one listing plus the new objects. The VersionId of a versioned bucket's objects is
learned on the way (the index's first response, or a HEAD pinned to the listed ETag). Between
epochs, a background thread indexes objects published since (``ahead.py``), so the next
epoch's resolution usually reads none.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from ...format import manifest as manifestmod
from ...format.digest import DEFAULT_ALGO, split_digest
from ...format.tario import MAX_SAMPLE_BYTES, TarError
from ...core.snapshot import FileId, ShardInfo
from ...core.candidate import Candidate
from ..source import NoShardsError, ShardSource
from .ahead import DEFAULT_INTERVAL, AheadIndexer
from .plans import Listed, Objects, list_prefix, plan_for
from .blocks import ObjectCorruptError, check_digest, index_object
from .http import HttpStore, is_http
from .s3 import (NULL_VERSION, ObjectChangedError, ObjectReadError, ObjectStat, ObjectUrl, ObjectVanishedError,
                    Store, same_etag)

log = logging.getLogger("wdsrefresh")

DEFAULT_THREADS = 8  # objects indexed (or HEADed) at once while an epoch resolves
INDEX_INTERVAL = "index_interval"
SOURCE_STORAGE_OPTIONS = (INDEX_INTERVAL,)  # storage_options the source takes before its store sees the rest


class RemoteTruncated(TarError):
    """An object that ends before its end-of-archive marker: broken (objects are published whole)."""


@dataclass(frozen=True)
class ObjectCandidate(Candidate):
    """An object a listing named, already resolved: ready (``info``), rejected (``error``), or
    gone since the listing (neither). ``file_id`` tells versions apart in warnings."""

    info: ShardInfo | None = None
    error: BaseException | None = None
    file_id: FileId | None = None


@dataclass(frozen=True)
class _Known:
    """What an object version (URL, ETag) was found to be: a ShardInfo, or the error rejecting it."""

    etag: str
    info: ShardInfo | None
    error: BaseException | None
    transient: bool = False  # a read that kept failing: not remembered, tried again next epoch


class ObjectSource(ShardSource):
    """The shards named by ``s3://`` or ``https://`` URLs, listed afresh at every epoch: a prefix,
    a glob, a brace pattern, one object, a manifest, or a list of these (see "Object stores" in
    the documentation). ``storage_options`` as in pandas and HF datasets: the store's
    (``s3.Store``, ``http.HttpStore``: endpoint, credentials, retries, read-ahead, the block
    cache), plus ``index_interval``: seconds between the background listings that index new
    objects ahead of the next epoch (0: none; the default for ``https://``, which has no listing)."""

    def __init__(self, spec: str | Iterable[str], storage_options: dict[str, Any] | None = None,
                 threads: int = DEFAULT_THREADS):
        self.specs = [spec] if isinstance(spec, str) else list(spec)
        if not self.specs:
            raise NoShardsError("an empty list of URLs names no shard")
        self.plans = [plan_for(s) for s in self.specs]
        options = dict(storage_options or {})
        interval = options.pop(INDEX_INTERVAL, None)
        self.store = _store(self.specs, options)
        if interval is None:  # a web server has no listing: a background pass would HEAD every URL
            interval = DEFAULT_INTERVAL if isinstance(self.store, Store) else 0
        self.ahead = AheadIndexer(float(interval))
        self.threads = max(1, threads)
        self.max_sample_bytes = MAX_SAMPLE_BYTES
        self._init_caches()

    def _init_caches(self) -> None:
        self._known: dict[str, _Known] = {}  # url -> what its current version is
        self._manifests: dict[str, tuple[str, list, list]] = {}  # url -> (etag, entries, errors)
        self._fragments: dict[str, tuple[str, list]] = {}  # fragment url -> (etag, entries)
        self._versioned: dict[str, bool | None] = {}
        self._ahead: dict[str, _Known] = {}  # url -> indexed by the background thread since the last epoch
        self._resolving = threading.Event()  # an epoch is resolving: the background thread waits its turn
        self._locks_in, self._lock_of_pid = (threading.Lock(), threading.Lock()), os.getpid()

    def _locks(self) -> tuple[threading.Lock, threading.Lock]:
        """This process's locks (fresh after a fork: the parent's background thread may have held them)."""
        if self._lock_of_pid != os.getpid():
            self._locks_in, self._lock_of_pid = (threading.Lock(), threading.Lock()), os.getpid()
        return self._locks_in

    @property
    def _lock(self) -> threading.Lock:
        """Guards the listing caches, ``_known`` and ``_ahead``."""
        return self._locks()[0]

    @property
    def _asking(self) -> threading.Lock:
        """Guards ``_versioned``: the indexing threads ask the store about a bucket once per listing."""
        return self._locks()[1]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_known", "_manifests", "_fragments", "_versioned", "_ahead", "_resolving", "_locks_in",
                    "_lock_of_pid"):
            state.pop(key)  # what the resolving process learned stays there
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def store_for(self, url: str) -> Store | HttpStore | None:
        """This source's own store, for the URLs of its protocol: its shards are read through the
        endpoint, credentials and headers they were listed with, in every process it reaches."""
        return self.store if is_http(url) == isinstance(self.store, HttpStore) else None

    def describe(self) -> str:
        if len(self.specs) == 1:
            return f"{self.plans[0].kind} {self.specs[0]!r}"
        return "objects [" + ", ".join(repr(s) for s in self.specs) + "]"

    def candidate(self, path: str) -> Candidate:
        raise NotImplementedError("objects are listed, never watched")

    def close(self) -> None:
        self.ahead.stop()

    def limit_samples(self, max_sample_bytes: int) -> None:
        if max_sample_bytes != self.max_sample_bytes:
            self.max_sample_bytes = max_sample_bytes
            with self._lock:
                self._known.clear()  # found under another limit
                self._ahead.clear()

    # ------------------------------------------------------------------ listing
    def candidates(self) -> list[Candidate]:
        self._resolving.set()
        try:
            with self._lock:
                items = self._list()
                found: dict[str, _Known | None] = dict(self._known_versions(items))
            todo = [item for item in items if item.stat.url not in found]
            if todo:
                with ThreadPoolExecutor(min(self.threads, len(todo)), thread_name_prefix="wdsrefresh-index") as pool:
                    found.update(zip((item.stat.url for item in todo), pool.map(self._resolve, todo)))
            with self._lock:
                self._known = {url: k for url, k in found.items() if k is not None and not k.transient}
                self._ahead = {url: k for url, k in self._ahead.items() if url not in self._known}
        finally:
            self._resolving.clear()
        self.ahead.ensure_running(self)
        return [_candidate(item, found[item.stat.url]) for item in items]

    def _known_versions(self, items: list[Listed]) -> dict[str, _Known]:
        """(Under ``_lock``.) What is already known of the listed versions: from the last epoch,
        or indexed since by the background thread."""
        found = {}
        for item in items:
            url = item.stat.url
            for known in (self._known.get(url), self._ahead.get(url)):
                if known is not None and same_etag(known.etag, item.stat.etag):
                    found[url] = known
                    break
        return found

    @property
    def indexed_ahead(self) -> list[str]:
        """The URLs indexed in the background since the last epoch resolved (``ahead.py``)."""
        with self._lock:
            return sorted(self._ahead)

    def index_ahead_once(self, stop: threading.Event) -> int:
        """One background pass (``ahead.py``): lists the source and indexes, one at a time, the
        listed versions nothing knows yet; stops early when an epoch starts resolving. Returns
        how many it indexed."""
        with self._lock:
            if self._resolving.is_set():  # asked again under the lock: candidates() sets it before taking it
                return 0
            items = self._list()
            seen = self._known_versions(items)
            listed = {item.stat.url for item in items}
            self._ahead = {url: k for url, k in self._ahead.items() if url in listed}  # deleted since: dropped
        indexed = 0
        for item in (item for item in items if item.stat.url not in seen):
            if stop.is_set() or self._resolving.is_set():
                break
            found = self._resolve(item)
            if found is not None and not found.transient:
                with self._lock:
                    self._ahead[item.stat.url] = found
                indexed += 1
        return indexed

    def _list(self) -> list[Listed]:
        """(Under ``_lock``: the manifest and fragment caches are updated on the way.)"""
        listed: dict[str, Listed] = {}
        singles: list[Objects] = []
        for plan in self.plans:
            if isinstance(plan, Objects):
                singles.append(plan)  # listed together below: one listing per parent prefix
                continue
            for item in plan.list(self):
                listed.setdefault(item.stat.url, item)
        if singles:
            for item in Objects([u for p in singles for u in p.urls]).list(self):
                listed.setdefault(item.stat.url, item)
        self._versioned.clear()  # asked again each listing, when an object needs it
        return list(listed.values())

    # ------------------------------------------------------------------ resolving one object
    def _resolve(self, item: Listed) -> _Known | None:
        """What the listed version of one object is; None when that cannot be known this epoch
        (deleted since the listing, or a read that kept failing: tried again next epoch)."""
        stat, entry = item.stat, item.entry
        try:
            if (entry is not None and entry.nsamples is not None and entry.filesize == stat.size
                    and same_etag(entry.etag, stat.etag) and entry.digest and entry.blocks is not None):
                version_id = stat.version_id  # known when a HEAD named the object
                if version_id is None and self._bucket_versioned(stat.url) is not False:
                    head = self.store.head(stat.url, if_match=stat.etag)
                    if head is None:
                        return None
                    version_id = head.version_id
                info = _info(stat, item.name, entry.nsamples, entry.digest, entry.blocks,
                             self._pinned_version(stat.url, version_id))
                return _Known(stat.etag, info, None)
            expected = entry.digest if (entry is not None and entry.digest and entry.filesize == stat.size
                                        and same_etag(entry.etag, stat.etag)) else None
            return self._indexed(stat, item.name, expected)
        except ObjectVanishedError:
            return None
        except ObjectReadError as exn:
            return _Known(stat.etag, None, exn, transient=True)

    def _indexed(self, stat: ObjectStat, name: str, expected_digest: str | None) -> _Known | None:
        algo = split_digest(expected_digest)[0] if expected_digest else DEFAULT_ALGO
        for _ in range(3):
            try:
                index = index_object(self.store, stat, algo, max_sample_bytes=self.max_sample_bytes)
                break
            except ObjectChangedError:  # replaced between the listing and the index: take the version there is now
                stat = self.store.head(stat.url)
                if stat is None:
                    return None
                expected_digest = None
            except TarError as exn:
                return _Known(stat.etag, None, exn)
        else:
            return _Known(stat.etag, None, ObjectReadError(stat.url, "replaced each time it was indexed"), True)
        if not index.complete:
            error = RemoteTruncated(stat.url, index.end, "ends before its end-of-archive marker (a broken upload?)")
            return _Known(stat.etag, None, error)
        if expected_digest:
            try:
                check_digest(stat.url, index, expected_digest)
            except ObjectCorruptError as exn:
                return _Known(stat.etag, None, exn)
        info = _info(stat, name, index.nsamples, index.digest, index.blocks,
                     self._pinned_version(stat.url, index.version_id))
        return _Known(stat.etag, info, None)

    def _pinned_version(self, url: str, version_id: str | None) -> str | None:
        """The VersionId a read of the object is pinned to: the one its store named, else ``null``
        in a versioned bucket (objects written before versioning was enabled: not every store names
        their version), so a replacement never changes what the snapshot reads."""
        if version_id is None and self._bucket_versioned(url):
            return NULL_VERSION
        return version_id

    def _bucket_versioned(self, url: str) -> bool | None:
        if is_http(url):
            return False  # a web server has no versions: the ETag pins
        bucket = ObjectUrl.parse(url).bucket
        with self._asking:
            versioned = self._versioned.get(bucket, ...)
            if versioned is ...:  # (the background thread's listing may clear the cache meanwhile)
                versioned = self._versioned[bucket] = self.store.versioning(bucket)
        return versioned

    def manifest(self, url: str, contained: bool) -> list[manifestmod.ManifestEntry]:
        """The entries of the manifest object at ``url``, fetched only when its ETag changed.

        A prefix's own manifest (``contained``) only saves reads: an invalid entry is ignored with
        a warning and its object indexed. A manifest given as the source raises ManifestError."""
        cached = self._manifests.get(url)
        fetched = self.store.get_if_changed(url, cached[0] if cached else None)
        if fetched is not None:
            data, etag = fetched
            base = url.rsplit("/", 1)[0] + "/"
            try:
                entries, errors = manifestmod.parse(manifestmod.decode(data, url), url, base, contained=contained)
            except manifestmod.ManifestError as exn:
                if not contained:
                    raise
                log.warning("%s; indexing the objects instead", exn)
                entries, errors = [], []
            for exn in errors if contained else ():
                log.warning("%s; entry ignored, the object is indexed instead", exn)
            cached = self._manifests[url] = (etag, entries, errors)
        etag, entries, errors = cached
        if errors and not contained:
            raise errors[0]
        return entries


    def fragment_entries(self, bucket: str, prefix: str) -> list[manifestmod.ManifestEntry]:
        """The entries of the fragments under ``s3://bucket/prefix/manifest.d/``, in name order;
        each fragment is fetched once per ETag (a fragment that cannot be read is ignored, with a
        warning: its objects are indexed)."""
        found, entries = {}, []
        for stat in list_prefix(self.store, bucket, f"{prefix}{manifestmod.FRAGMENTS_DIR}/", "/"):
            if not _FRAGMENT_RE.match(posixpath.basename(stat.url)):
                continue
            cached = self._fragments.get(stat.url)
            if cached is None or not same_etag(cached[0], stat.etag):
                try:
                    data, etag = self.store.get_if_changed(stat.url, None)
                    parsed, errors = manifestmod.parse(manifestmod.decode(data, stat.url), stat.url,
                                                       f"s3://{bucket}/{prefix}", contained=True)
                except ObjectVanishedError:
                    continue  # merged into manifest.json and removed since the listing
                except (ObjectReadError, manifestmod.ManifestError) as exn:
                    log.warning("%s; ignored, its objects are indexed instead", exn)
                    continue
                for exn in errors:
                    log.warning("%s; entry ignored, the object is indexed instead", exn)
                cached = (etag, parsed)
            found[stat.url] = cached
            entries += cached[1]
        self._fragments = found
        return entries


_FRAGMENT_RE = re.compile(r"part-[0-9a-f]+-\d+\.json$")


def _candidate(item: Listed, known: _Known | None) -> ObjectCandidate:
    """The candidate for a listed object; neither info nor error when it was deleted since."""
    stat = item.stat
    file_id = FileId(0, 0, stat.size, stat.mtime_ns)
    if known is None:
        return ObjectCandidate(stat.url, stat.url, name=item.name, file_id=file_id)
    info = known.info
    if info is not None and info.name != item.name:
        info = replace(info, name=item.name)
    return ObjectCandidate(stat.url, stat.url, name=item.name, info=info, error=known.error, file_id=file_id)


def _info(stat: ObjectStat, name: str, nsamples: int, digest: str | None, blocks: bytes | None,
          version_id: str | None) -> ShardInfo:
    return ShardInfo(url=stat.url, path=stat.url, size=stat.size, mtime_ns=stat.mtime_ns, nsamples=nsamples,
                     digest=digest, blocks=blocks, name=name, etag=stat.etag, version_id=version_id)


def _store(specs: list[str], storage_options: dict[str, Any] | None) -> Store | HttpStore:
    """The store the source's URLs are read through: one protocol per source."""
    web = [is_http(s) for s in specs]
    if all(web):
        return HttpStore(storage_options, also_known=SOURCE_STORAGE_OPTIONS)
    if any(web):
        raise ValueError("a list of URLs mixes https:// and s3:// URLs, whose storage_options differ: "
                         "one source reads one protocol")
    return Store(storage_options, also_known=SOURCE_STORAGE_OPTIONS)
