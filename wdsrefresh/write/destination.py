"""Where pack and ingest publish shards: a local directory, or a prefix in an object store.

Both hold the same layout (``publish.py``): ``PREFIX-NNNNNN.tar`` shards, ``manifest.json``,
``manifest.d/part-*.json`` fragments and ``.wdsrefresh/plans/``. They differ in how each step
is made safe:

========================  ==================================  ===========================================
step                      local directory                     ``s3://bucket/prefix/``
========================  ==================================  ===========================================
take shard numbers        under the directory lock            a compare-and-swap of ``.wdsrefresh/
                                                              numbers.json`` (``If-Match`` its ETag, or
                                                              ``If-None-Match: *`` for the first)
reserve a plan            exclusive create of its file        ``PUT`` with ``If-None-Match: *``
one run of a plan         ``flock`` on the plan file          none: two runs of one plan do the same
                                                              work and converge (conditional creates)
publish a shard           temporary name, fsync, hard link    one ``PUT`` (multipart above
                          (never replaces)                    ``multipart_threshold``) with
                                                              ``If-None-Match: *``: visible whole or
                                                              not at all, never replaces an object
a task's fragment         written after its shard             the same; its entries carry the ETag
compact into manifest     under the directory lock            ``PUT`` ``If-Match`` the old manifest's
                                                              ETag, read again and retried on 412
sweep leftovers           hidden temporaries                  unfinished multipart uploads of the plan's
                                                              shards; the plan's local temporaries
========================  ==================================  ===========================================

A shard bound for an object store is written to a local temporary file first (in
``tempfile.gettempdir()``, i.e. ``$TMPDIR``), uploaded, and removed. Readers of a prefix list
it: an object is there whole or not at all, so a listing at any moment shows only complete
shards; the fragments and the manifest only spare readers from indexing them.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import posixpath
import random
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

from ..errors import WdsRefreshError
from ..format import manifest as manifestmod
from ..format.atomic import dead_temporaries, unlink_quietly, write_atomic
from ..format.manifest import FRAGMENTS_DIR, ManifestEntry
from ..format.names import is_shard_name
from ..format.tario import index_shard
from ..storage.backend import backend_for
from . import publish

NUMBERS_KEY = ".wdsrefresh/numbers.json"  # on object stores: the next free shard number of each prefix
DEFAULT_MULTIPART_THRESHOLD = 64 * 2**20
DEFAULT_PART_SIZE = 64 * 2**20  # S3 takes parts of 5 MiB to 5 GiB, at most 10000 of them
UPLOAD_THREADS = 4  # parts of one shard in flight at once
CAS_ATTEMPTS = 50  # conditional writes tried before giving up (each loses only to another writer's success)
_FRAGMENT_RE = re.compile(r"part-([0-9a-f]+)-(\d+)\.json$")
_PLAN_RE = re.compile(r"plan-([0-9a-f]+)\.json$")


class DestinationError(WdsRefreshError, OSError):
    """The destination cannot be written as asked; the message names it and says why."""


class PlanBusy(DestinationError):
    """Another process holds the plan (it is running the same pack)."""


@dataclass(frozen=True)
class FoundPlan:
    doc: dict
    location: str  # a path or URL, for messages
    committed: bool


def open_destination(out: str | Destination, storage_options: dict | None = None, **options: Any) -> Destination:
    """``out`` as a Destination: an ``s3://bucket/prefix/`` URL or a local directory."""
    if isinstance(out, Destination):
        return out
    backend = backend_for(out)
    if backend.name not in DESTINATIONS:
        raise DestinationError(f"{out}: only s3:// URLs and local directories can be written")
    if backend.local:
        if storage_options:
            raise DestinationError(f"{out}: storage options apply to s3:// URLs, not to a local directory")
        return LocalDestination(out)
    return DESTINATIONS[backend.name](out, storage_options, **options)


class Destination(ABC):
    """What pack and ingest do to their output, step by step (see the module docstring); ``url``
    names it, ``remote`` says its shards are uploaded from local temporaries. Names are relative
    to the output; shard names are ``PREFIX-NNNNNN.tar``."""

    url: str
    remote = False

    @abstractmethod
    def location(self, name: str) -> str:
        """Where ``name`` is, for messages and reports."""

    @abstractmethod
    def prepare(self) -> None:
        """Makes the output ready to be written, or fails first (a missing bucket, no credentials)."""

    # ---- plans
    @abstractmethod
    def numbering(self) -> AbstractContextManager:
        """Held while a plan is found or reserved (what makes taking shard numbers safe)."""

    @abstractmethod
    def find_plan(self, digest: str) -> FoundPlan | None:
        """The plan ``digest`` names, committed or not; None when there is none."""

    @abstractmethod
    def unfinished_plans(self) -> dict[str, tuple[str, dict]]:
        """``{hash: (location, document)}`` of the plans not committed yet."""

    @abstractmethod
    def reserve_plan(self, digest: str, prefix: str, count: int, doc_for: Callable[[list[str]], dict],
                     ) -> tuple[list[str], str]:
        """Names for ``count`` fresh shards and the location of the plan reserving them (the
        document ``doc_for(names)``); call within ``numbering``."""

    @abstractmethod
    def hold_plan(self, digest: str, shared: bool = False) -> Callable[[], None]:
        """Holds the plan until the returned function is called (``shared`` with the plan's other
        array tasks); PlanBusy when another run holds it."""

    @abstractmethod
    def done_location(self, digest: str) -> str:
        """Where the committed plan ``digest`` is recorded."""

    @abstractmethod
    def finished_tasks(self, digest: str) -> set[int]:
        """The tasks of plan ``digest`` whose fragment exists."""

    @abstractmethod
    def committed_urls(self) -> set[str]:
        """The shard names the manifest lists."""

    @abstractmethod
    def load_fragment(self, digest: str, task: int) -> list[ManifestEntry] | None:
        """The entries of task ``task``'s fragment of plan ``digest``; None without one."""

    @abstractmethod
    def temporary(self, digest: str, task: int, kind: str = "pack") -> str:
        """The local path a task writes its shard to before ``publish``."""

    # ---- shards
    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether ``name`` exists."""

    @abstractmethod
    def publish(self, tmp_path: str, entry: ManifestEntry) -> ManifestEntry | None:
        """Puts the finished shard ``tmp_path`` under ``entry.url`` without replacing anything;
        its entry, or None (``tmp_path`` removed) when that name exists already."""

    @abstractmethod
    def publish_next(self, tmp_path: str, prefix: str, entry: ManifestEntry) -> ManifestEntry:
        """Puts the finished shard ``tmp_path`` under the next free name ``PREFIX-NNNNNN.tar``
        (``entry.url`` is replaced by it); its entry."""

    @abstractmethod
    def indexed(self, name: str) -> tuple[ManifestEntry, bool]:
        """The entry of the shard ``name`` as it is now, and whether it is complete; TarError
        if it is not a tar."""

    @abstractmethod
    def shard_names(self) -> set[str]:
        """The shard names directly in the output."""

    @abstractmethod
    def reserved_names(self) -> set[str]:
        """The shard names plans reserved."""

    @abstractmethod
    def shard_identity(self, name: str) -> tuple[int, object] | None:
        """``(size, version)`` of the shard ``name`` (a change of either is a new shard); None
        without one."""

    @abstractmethod
    def open_shard(self, name: str) -> AbstractContextManager:
        """The shard ``name`` as a binary file, read from its start."""

    # ---- records, fragments, the manifest
    @abstractmethod
    def read_record(self, name: str) -> bytes | None:
        """The bytes of the small file ``name``; None without one."""

    @abstractmethod
    def list_records(self, folder: str) -> list[str]:
        """The base names in ``folder``."""

    @abstractmethod
    def write_record(self, name: str, data: bytes, create: bool = False) -> bool:
        """Writes the small file ``name`` whole; with ``create``, only if there is none (False
        when there was one)."""

    @abstractmethod
    def write_fragment(self, digest: str, task: int, entries: Sequence[ManifestEntry]) -> None:
        """Records task ``task``'s shards of plan ``digest`` (after the shards exist)."""

    @abstractmethod
    def fragment_entries(self) -> list[ManifestEntry]:
        """The entries of every fragment not merged into the manifest yet."""

    @abstractmethod
    def manifest_entries(self) -> list[ManifestEntry]:
        """The entries of ``manifest.json`` (none without one)."""

    @abstractmethod
    def sweep(self, digest: str, names: Sequence[str]) -> None:
        """Removes what killed tasks of plan ``digest`` left (call holding the plan)."""

    @abstractmethod
    def commit(self, digest: str | None) -> list[ManifestEntry]:
        """Merges the fragments into ``manifest.json`` (the plan ``digest``'s, or all of them);
        the manifest's entries."""


# ---------------------------------------------------------------------------- a local directory


class LocalDestination(Destination):
    """A local directory; the steps are ``publish.py``'s."""

    def __init__(self, path: str):
        self.url = self.path = path

    def location(self, name: str) -> str:
        return os.path.join(self.path, name)

    def prepare(self) -> None:
        os.makedirs(self.path, exist_ok=True)

    # ---- plans
    @contextmanager
    def numbering(self) -> Iterator[None]:
        """Held while a plan is found or reserved: the directory lock."""
        with publish.out_lock(self.path):
            publish.sweep_plan_temporaries(self.path)
            yield

    def find_plan(self, digest: str) -> FoundPlan | None:
        for path, committed in ((publish.done_path(self.path, digest), True),
                                (publish.plan_path(self.path, digest), False)):
            if os.path.exists(path):
                return FoundPlan(publish.load_plan(path), path, committed)
        return None

    def unfinished_plans(self) -> dict[str, tuple[str, dict]]:
        """``{hash: (location, document)}`` of the plans not committed yet."""
        found = {}
        for digest, path in publish.plan_paths(self.path).items():
            try:
                found[digest] = (path, publish.load_plan(path))
            except FileNotFoundError:
                continue
        return found

    def reserve_plan(self, digest: str, prefix: str, count: int, doc_for: Callable[[list[str]], dict],
                     ) -> tuple[list[str], str]:
        """Names for ``count`` shards after the highest taken, and the plan reserving them
        (call within ``numbering``)."""
        first = publish.next_number(self.path, prefix)
        names = [publish.shard_name(prefix, first + i) for i in range(count)]
        return names, publish.create_plan(self.path, digest, doc_for(names))

    def hold_plan(self, digest: str, shared: bool = False) -> Callable[[], None]:
        """Holds the plan until the returned function is called: exclusively, or ``shared`` with
        the other array tasks of the plan; PlanBusy when another holds it otherwise."""
        fd = os.open(publish.plan_path(self.path, digest), os.O_RDONLY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PlanBusy(publish.plan_path(self.path, digest)) from None
        return lambda: os.close(fd)

    def done_location(self, digest: str) -> str:
        return publish.done_path(self.path, digest)

    # ---- tasks
    def finished_tasks(self, digest: str) -> set[int]:
        return _tasks_of(digest, [os.path.basename(p) for p in manifestmod.fragment_paths(self.path)])

    def committed_urls(self) -> set[str]:
        return {e.url for e in publish.manifest_entries(self.path)}

    def load_fragment(self, digest: str, task: int) -> list[ManifestEntry] | None:
        try:
            return publish.load_fragment(publish.fragment_path(self.path, digest, task))[1]
        except FileNotFoundError:
            return None

    def temporary(self, digest: str, task: int, kind: str = "pack") -> str:
        return os.path.join(self.path, f".{kind}-{digest[:16]}-{task:05d}.{os.getpid()}.tar.tmp")

    def exists(self, name: str) -> bool:
        return os.path.lexists(os.path.join(self.path, name))

    def publish(self, tmp_path: str, entry: ManifestEntry) -> ManifestEntry | None:
        """Puts the finished shard ``tmp_path`` under ``entry.url`` without replacing anything;
        its entry, or None (``tmp_path`` removed) when that name exists already."""
        try:
            publish.rename_without_replacing(tmp_path, os.path.join(self.path, entry.url))
        except FileExistsError:
            unlink_quietly(tmp_path)
            entry = None
        publish.fsync_dir_named(self.path)
        return entry

    def indexed(self, name: str) -> tuple[ManifestEntry, bool]:
        """The entry of the shard ``name`` as it is now, and whether it is complete; TarError if
        it is not a tar."""
        path = os.path.join(self.path, name)
        st = os.stat(path)
        index = index_shard(path, url=name)
        return ManifestEntry(name, index.nsamples, st.st_size, index.digest, index.blocks, st.st_mtime_ns), \
            index.complete

    def publish_next(self, tmp_path: str, prefix: str, entry: ManifestEntry) -> ManifestEntry:
        """Puts the finished shard ``tmp_path`` under the next free name ``PREFIX-NNNNNN.tar``
        (``entry.url`` is replaced by it); its entry (``wr.Writer``)."""
        with publish.out_lock(self.path):
            name = publish.shard_name(prefix, publish.next_number(self.path, prefix))
            published = self.publish(tmp_path, replace(entry, url=name))
        if published is None:
            raise DestinationError(f"{self.location(name)}: appeared while it was being published")
        return published

    def write_fragment(self, digest: str, task: int, entries: Sequence[ManifestEntry]) -> None:
        publish.write_fragment(self.path, digest, task, entries)

    # ---- what readers may list, and small records beside the shards (keys.py, labels.py)
    def shard_names(self) -> set[str]:
        """Shard-named files directly in the directory."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return set()
        return {n for n in names if is_shard_name(n) and os.path.isfile(os.path.join(self.path, n))}

    def fragment_entries(self) -> list[ManifestEntry]:
        return publish.fragment_entries(self.path)

    def reserved_names(self) -> set[str]:
        return publish.reserved_names(self.path)

    def shard_identity(self, name: str) -> tuple[int, object] | None:
        """``(size, mtime_ns)`` of the shard file ``name`` (a change of either is a new file); None without one."""
        try:
            st = os.stat(os.path.join(self.path, name))
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    @contextmanager
    def open_shard(self, name: str) -> Iterator[Any]:
        """The shard ``name`` as a binary file, read from its start."""
        with open(os.path.join(self.path, name), "rb") as f:
            yield f

    def read_record(self, name: str) -> bytes | None:
        """The bytes of the small file ``name`` (relative to the directory); None without one."""
        try:
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def list_records(self, folder: str) -> list[str]:
        """The base names in ``folder`` (relative to the directory)."""
        try:
            return sorted(os.listdir(os.path.join(self.path, folder)))
        except FileNotFoundError:
            return []

    def write_record(self, name: str, data: bytes, create: bool = False) -> bool:
        """Writes the small file ``name`` atomically and durably; with ``create``, only if there is
        none (False when there was one)."""
        path = os.path.join(self.path, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not create:
            write_atomic(path, data, durable=True)
            return True
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        write_atomic(tmp, data, durable=True)
        try:
            publish.rename_without_replacing(tmp, path)
        except FileExistsError:
            unlink_quietly(tmp)
            return False
        publish.fsync_dir_named(os.path.dirname(path))
        return True

    def sweep(self, digest: str, names: Sequence[str]) -> None:
        """Removes what killed tasks of the plan left (call holding the plan), and the temporary
        files of manifests and records whose writer was killed."""
        publish.sweep_task_temporaries(self.path, digest)
        for path in dead_temporaries(self.path):
            unlink_quietly(path)

    # ---- the manifest
    def commit(self, digest: str) -> list[ManifestEntry]:
        return publish.commit(self.path, digest)

    def manifest_entries(self) -> list[ManifestEntry]:
        return publish.manifest_entries(self.path)


# ---------------------------------------------------------------------------- an object store


class S3Destination(Destination):
    """``s3://bucket/prefix/``; ``storage_options`` as ``storage/objects/s3.Store`` takes them. The
    boto3 client is made on first use in each process (never pickled)."""

    remote = True

    def __init__(self, url: str, storage_options: dict | None = None,
                 multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD, part_size: int = DEFAULT_PART_SIZE):
        from ..storage.objects import ObjectUrl, Store

        where = ObjectUrl.parse(url)
        prefix = where.key if where.key == "" or where.key.endswith("/") else where.key + "/"
        if is_shard_name(prefix.rstrip("/")) or prefix.rstrip("/").endswith(".json"):
            raise DestinationError(f"{url}: give a prefix (s3://bucket/prefix/) to write shards under, "
                                   "not an object's name")
        self.bucket, self.prefix = where.bucket, prefix
        self.url = str(ObjectUrl(self.bucket, self.prefix))
        self.store = Store(storage_options)
        self.multipart_threshold = max(1, multipart_threshold)
        self.part_size = max(5 * 2**20, part_size)

    def __repr__(self) -> str:
        return f"S3Destination({self.url!r}, {self.store!r})"  # the store names option keys, never values

    def location(self, name: str) -> str:
        return self.url + name

    def prepare(self) -> None:
        """Checks the bucket can be listed (a missing bucket or no credentials fail here, first)."""
        from ..storage.objects import ObjectVanishedError

        try:
            next(iter(self._list(FRAGMENTS_DIR + "/")), None)
        except ObjectVanishedError:
            raise DestinationError(f"{self.url}: no such bucket ({self.bucket}); create it first") from None

    # ---- requests
    def _client(self) -> Any:
        return self.store.client()

    def _list(self, sub: str, delimiter: str | None = "/") -> Iterator[Any]:
        """ObjectStats of the keys ``prefix + sub*`` (not below a further ``/``)."""
        return self.store.list(self.bucket, self.prefix + sub, delimiter)

    def _get(self, name: str) -> tuple[bytes, str] | None:
        """``(bytes, ETag)`` of the small object ``name``, or None when there is none."""
        from ..storage.objects import ObjectVanishedError

        try:
            return self.store.get_if_changed(self.location(name), None)
        except ObjectVanishedError:
            return None

    def _get_json(self, name: str) -> tuple[Any, str] | None:
        got = self._get(name)
        return None if got is None else (manifestmod.decode(got[0], self.location(name)), got[1])

    def _put(self, name: str, data: bytes, *, if_match: str | None = None, create: bool = False) -> str:
        """PUTs ``data`` as ``name``; returns its ETag. ``create``: only if there is no such
        object; ``if_match``: only if it is still that version. Raises ObjectChangedError when
        the condition fails (another writer was first)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + name, "Body": data}
        if if_match:
            kwargs["IfMatch"] = if_match
        if create:
            kwargs["IfNoneMatch"] = "*"
        return self.store.call(self.location(name), "PUT", lambda: self._client().put_object(**kwargs))["ETag"]

    def _put_json(self, name: str, doc: object, **conditions: Any) -> str:
        return self._put(name, json.dumps(doc, indent=1).encode(), **conditions)

    def _delete(self, name: str) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self.prefix + name}
        self.store.call(self.location(name), "DELETE", lambda: self._client().delete_object(**kwargs))

    # ---- plans
    def numbering(self):
        return nullcontext()  # each step below is a conditional write of its own

    def find_plan(self, digest: str) -> FoundPlan | None:
        for name, committed in ((_plan_name("done", digest), True), (_plan_name("plan", digest), False)):
            got = self._get_json(name)
            if got is not None:
                return FoundPlan(_checked_plan(got[0], self.location(name)), self.location(name), committed)
        return None

    def unfinished_plans(self) -> dict[str, tuple[str, dict]]:
        """``{hash: (URL, document)}`` of the plans not committed yet (a plan whose ``done-``
        twin exists is committed: a commit killed before it removed the plan left it)."""
        names = {posixpath.basename(s.url) for s in self._list(publish.PLANS_DIR + "/")}
        found = {}
        for name in sorted(names):
            match = _PLAN_RE.match(name)
            if not match or f"done-{match.group(1)}.json" in names:
                continue
            got = self._get_json(f"{publish.PLANS_DIR}/{name}")
            if got is not None:
                found[match.group(1)] = (self.location(f"{publish.PLANS_DIR}/{name}"),
                                         _checked_plan(got[0], self.location(f"{publish.PLANS_DIR}/{name}")))
        return found

    def reserve_plan(self, digest: str, prefix: str, count: int, doc_for: Callable[[list[str]], dict],
                     ) -> tuple[list[str], str]:
        """Takes ``count`` shard numbers, then creates the plan naming them (``If-None-Match``).
        When the same plan was created meanwhile (the same pack run twice at once), that plan's
        names are used: the numbers just taken stay unused."""
        from ..storage.objects import ObjectChangedError

        names = self.reserve_names(prefix, count)
        name = _plan_name("plan", digest)
        try:
            self._put_json(name, doc_for(names), create=True)
        except ObjectChangedError:
            found = self.find_plan(digest)
            if found is None:
                raise DestinationError(f"{self.location(name)}: created and removed again while reserving it")
            names = [t["shard"] for t in found.doc["tasks"]]
        return names, self.location(name)

    def reserve_names(self, prefix: str, count: int) -> list[str]:
        """``count`` fresh shard names: numbers after the highest of the counter, the shards listed
        and the manifest's and fragments' entries, taken with a compare-and-swap of the counter."""
        from ..storage.objects import ObjectChangedError

        pattern = re.compile(re.escape(prefix) + r"-(\d+)\.tar(?:\.gz)?$")
        taken = [posixpath.basename(s.url) for s in self._list("")]
        taken += [posixpath.basename(e.url) for e in self.manifest_entries() + self.fragment_entries()]
        seen = max((int(m.group(1)) for m in map(pattern.match, taken) if m), default=-1) + 1
        for _ in range(CAS_ATTEMPTS):
            got = self._get_json(NUMBERS_KEY)
            doc, etag = got if got is not None else ({"version": 1, "next": {}}, None)
            first = max(seen, int(doc.get("next", {}).get(prefix, 0)))
            doc.setdefault("next", {})[prefix] = first + count
            try:
                self._put_json(NUMBERS_KEY, doc, if_match=etag, create=etag is None)
            except ObjectChangedError:
                time.sleep(random.uniform(0, 0.05))  # another writer took numbers first: read again
                continue
            return [publish.shard_name(prefix, first + i) for i in range(count)]
        raise DestinationError(f"{self.location(NUMBERS_KEY)}: could not take shard numbers in {CAS_ATTEMPTS} "
                               "attempts (other writers kept changing it)")

    def hold_plan(self, digest: str, shared: bool = False) -> Callable[[], None]:
        return lambda: None  # no lock on an object store: see the module docstring

    def done_location(self, digest: str) -> str:
        return self.location(_plan_name("done", digest))

    # ---- tasks
    def finished_tasks(self, digest: str) -> set[int]:
        return _tasks_of(digest, [posixpath.basename(s.url) for s in self._list(f"{FRAGMENTS_DIR}/part-{digest[:16]}-")])

    def committed_urls(self) -> set[str]:
        return {e.url for e in self.manifest_entries()}

    def load_fragment(self, digest: str, task: int) -> list[ManifestEntry] | None:
        name = _fragment_name(digest, task)
        got = self._get_json(name)
        return None if got is None else _entries(got[0], self.location(name), self.url)

    def temporary(self, digest: str, task: int, kind: str = "pack") -> str:
        return os.path.join(tempfile.gettempdir(),
                            f".wdsrefresh-{kind}-{digest[:16]}-{task:05d}.{os.getpid()}.tar.tmp")

    def exists(self, name: str) -> bool:
        return self.store.head(self.location(name)) is not None

    def publish(self, tmp_path: str, entry: ManifestEntry) -> ManifestEntry | None:
        """Uploads the finished shard ``tmp_path`` as ``entry.url`` unless that object exists, and
        removes ``tmp_path``; the entry with the object's ETag, or None when it existed."""
        try:
            etag = self._upload(tmp_path, entry.url)
        finally:
            unlink_quietly(tmp_path)
        if etag is None:
            return None
        stat = self.store.head(self.location(entry.url), if_match=etag)
        if stat is None or stat.size != entry.filesize:
            raise DestinationError(f"{self.location(entry.url)}: uploaded {entry.filesize} bytes, the store "
                                   f"holds {'nothing' if stat is None else f'{stat.size} bytes'}")
        return ManifestEntry(entry.url, entry.nsamples, entry.filesize, entry.digest, entry.blocks, None, stat.etag)

    def _upload(self, path: str, name: str) -> str | None:
        """The ETag of the new object ``name`` holding the file ``path``; None if it existed."""
        from ..storage.objects import ObjectChangedError

        size = os.path.getsize(path)
        try:
            if size <= self.multipart_threshold:
                with open(path, "rb") as f:
                    return self._put(name, f.read(), create=True)
            return self._upload_parts(path, name, size)
        except ObjectChangedError:
            return None

    def _upload_parts(self, path: str, name: str, size: int) -> str:
        """A multipart upload, completed with ``If-None-Match: *``; aborted on any failure."""
        url, key = self.location(name), self.prefix + name
        client = self._client
        upload = self.store.call(url, "CreateMultipartUpload",
                                 lambda: client().create_multipart_upload(Bucket=self.bucket, Key=key))["UploadId"]
        fd = os.open(path, os.O_RDONLY)
        try:
            def part(number: int) -> dict:
                start = (number - 1) * self.part_size
                data = os.pread(fd, self.part_size, start)
                r = self.store.call(url, f"UploadPart {number}", lambda: client().upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=data),
                    start, start + len(data))
                return {"PartNumber": number, "ETag": r["ETag"]}

            count = -(-size // self.part_size)
            with ThreadPoolExecutor(min(UPLOAD_THREADS, count), thread_name_prefix="wdsrefresh-upload") as pool:
                parts = list(pool.map(part, range(1, count + 1)))
            return self.store.call(url, "CompleteMultipartUpload", lambda: client().complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts},
                IfNoneMatch="*"))["ETag"]
        except BaseException:
            self._abort(key, upload)
            raise
        finally:
            os.close(fd)

    def _abort(self, key: str, upload: str) -> None:
        try:
            self._client().abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
        except Exception:  # noqa: BLE001 - best effort: the sweep of the next run aborts it too
            pass

    def publish_next(self, tmp_path: str, prefix: str, entry: ManifestEntry) -> ManifestEntry:
        """Uploads the finished shard ``tmp_path`` under a shard name taken from the counter
        (``entry.url`` is replaced by it); its entry with the object's ETag (``wr.Writer``)."""
        name = self.reserve_names(prefix, 1)[0]
        published = self.publish(tmp_path, replace(entry, url=name))
        if published is None:
            raise DestinationError(f"{self.location(name)}: exists already, though the counter "
                                   f"{self.location(NUMBERS_KEY)} gave its number out as free")
        return published

    # ---- what readers may list, and small records beside the shards (keys.py, labels.py)
    def shard_names(self) -> set[str]:
        return set(self.shard_objects())

    def reserved_names(self) -> set[str]:
        return {t["shard"] for _, doc in self.unfinished_plans().values() for t in doc["tasks"]}

    def shard_identity(self, name: str) -> tuple[int, object] | None:
        """``(size, ETag)`` of the object ``name``; None without one."""
        stat = self.store.head(self.location(name))
        return None if stat is None else (stat.size, stat.etag)

    @contextmanager
    def open_shard(self, name: str) -> Iterator[Any]:
        """The object ``name`` as a binary stream (one GET pinned to its ETag)."""
        import io

        from ..storage.objects import ObjectVanishedError

        stat = self.store.head(self.location(name))
        if stat is None:
            raise ObjectVanishedError(self.location(name), "no such object")
        block = 2**20
        blocks = self.store.read_blocks(stat.url, 0, -(-stat.size // block), block, stat.size, etag=stat.etag,
                                        version_id=stat.version_id)
        stream = io.BufferedReader(_BlockStream(data for data, _, _ in blocks))
        try:
            yield stream
        finally:
            blocks.close()

    def read_record(self, name: str) -> bytes | None:
        got = self._get(name)
        return None if got is None else got[0]

    def list_records(self, folder: str) -> list[str]:
        return sorted(posixpath.basename(s.url) for s in self._list(folder.rstrip("/") + "/"))

    def write_record(self, name: str, data: bytes, create: bool = False) -> bool:
        """PUTs the small object ``name``; with ``create``, only if there is none (``If-None-Match``;
        False when there was one)."""
        from ..storage.objects import ObjectChangedError

        try:
            self._put(name, data, create=create)
        except ObjectChangedError:
            if not create:
                raise
            return False
        return True

    def indexed(self, name: str) -> tuple[ManifestEntry, bool]:
        from ..storage.objects import ObjectVanishedError, index_object

        stat = self.store.head(self.location(name))
        if stat is None:
            raise ObjectVanishedError(self.location(name), "deleted while it was checked")
        index = index_object(self.store, stat)
        return ManifestEntry(name, index.nsamples, stat.size, index.digest, index.blocks, None, stat.etag), \
            index.complete

    def write_fragment(self, digest: str, task: int, entries: Sequence[ManifestEntry]) -> None:
        doc = {"__kind__": manifestmod.KIND, "wids_version": 1, "name": self._name(), "plan": digest, "task": task,
               "shardlist": [e.to_json() for e in entries]}
        self._put_json(_fragment_name(digest, task), doc)

    def sweep(self, digest: str, names: Sequence[str]) -> None:
        """Aborts the unfinished multipart uploads of the plan's shards, and removes the local
        temporaries of its tasks whose process is gone."""
        keys = {self.prefix + n for n in names}
        kwargs = {"Bucket": self.bucket, "Prefix": self.prefix}
        while True:
            page = self.store.call(self.url, "ListMultipartUploads",
                                   lambda: self._client().list_multipart_uploads(**kwargs))
            for upload in page.get("Uploads", ()):
                if upload["Key"] in keys:
                    self._abort(upload["Key"], upload["UploadId"])
            if not page.get("IsTruncated"):
                break
            kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
        _sweep_dead_temporaries(tempfile.gettempdir(), f".wdsrefresh-pack-{digest[:16]}-")

    # ---- the manifest
    def _name(self) -> str:
        return posixpath.basename(self.prefix.rstrip("/")) or self.bucket

    def manifest(self) -> list[ManifestEntry] | None:
        """The entries of ``manifest.json``; None when there is none."""
        got = self._get_json(manifestmod.DEFAULT_NAME)
        return None if got is None else _entries(got[0], self.location(manifestmod.DEFAULT_NAME), self.url)

    def manifest_entries(self) -> list[ManifestEntry]:
        return self.manifest() or []

    def shard_objects(self) -> dict[str, Any]:
        """``{name: ObjectStat}`` of the shard-named objects directly under the prefix, in key order."""
        stats = ((s.url[len(self.url):], s) for s in self._list(""))
        return {name: stat for name, stat in stats if is_shard_name(name)}

    def fragments(self) -> list[tuple[str, str | None, list[ManifestEntry]]]:
        """``(name, owner plan, entries)`` of every fragment, in name order."""
        found = []
        for stat in self._list(FRAGMENTS_DIR + "/"):
            name = stat.url[len(self.url):]
            got = self._get_json(name) if _FRAGMENT_RE.match(posixpath.basename(name)) else None
            if got is not None:
                owner = got[0].get("plan") if isinstance(got[0], dict) else None
                found.append((name, owner, _entries(got[0], self.location(name), self.url)))
        return found

    def fragment_entries(self) -> list[ManifestEntry]:
        return [e for _, _, entries in self.fragments() for e in entries]

    def commit(self, digest: str | None) -> list[ManifestEntry]:
        """Merges the fragments into ``manifest.json`` with a conditional PUT (``If-Match`` the
        manifest read, or ``If-None-Match: *``), read again and retried when another writer was
        first; then removes them, and marks the plan ``digest`` (if any) done. Fragments of other
        plans still running are left to their own commit. Returns the entries of the plan's shards."""
        from ..storage.objects import ObjectChangedError

        plans = self.unfinished_plans()
        found = self.find_plan(digest) if digest else None  # committed already by a concurrent run: its names
        mine = [t["shard"] for t in found.doc["tasks"]] if found else []
        for _ in range(CAS_ATTEMPTS):
            got = self._get_json(manifestmod.DEFAULT_NAME)
            etag = got[1] if got is not None else None
            entries = [] if got is None else _entries(got[0], self.location(manifestmod.DEFAULT_NAME), self.url)
            merged, new = publish.merge_fragments(entries, self.fragments(), digest, plans)
            if not new and got is not None:
                break
            try:
                self._put_json(manifestmod.DEFAULT_NAME, manifestmod.document(entries + new, self._name()),
                               if_match=etag, create=etag is None)
                break
            except ObjectChangedError:
                time.sleep(random.uniform(0, 0.05))
        else:
            raise DestinationError(f"{self.location(manifestmod.DEFAULT_NAME)}: not updated in {CAS_ATTEMPTS} "
                                   "attempts (other writers kept changing it)")
        for name in merged:
            self._delete(name)
        if found is not None:
            if not found.committed:  # done first: a kill between leaves both (committed), never neither
                self._put_json(_plan_name("done", digest), found.doc)
            self._delete(_plan_name("plan", digest))
        by_url = {e.url: e for e in entries + new}
        return [by_url[name] for name in mine if name in by_url]


# ---------------------------------------------------------------------------- helpers


class _BlockStream(io.RawIOBase):
    """An iterator of byte strings as a readable raw stream (for ``tarfile``'s stream mode)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._left = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            self._left = next(self._chunks, b"")
            if not self._left:
                return 0
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _plan_name(kind: str, digest: str) -> str:
    return f"{publish.PLANS_DIR}/{kind}-{digest}.json"


def _fragment_name(digest: str, task: int) -> str:
    return f"{FRAGMENTS_DIR}/part-{digest[:16]}-{task:05d}.json"


def _tasks_of(digest: str, names: Sequence[str]) -> set[int]:
    """The task numbers of the plan ``digest``'s fragments among file names ``names``."""
    return {int(m.group(2)) for m in map(_FRAGMENT_RE.match, names) if m and m.group(1) == digest[:16]}


def _checked_plan(doc: object, where: str) -> dict:
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        raise DestinationError(f"{where}: not a pack plan (no 'tasks' list); remove it to abandon that pack")
    return doc


def _entries(doc: object, where: str, base: str) -> list[ManifestEntry]:
    """The entries of a manifest or fragment document; ManifestError for the first bad one (a
    writer never rewrites a manifest around an entry it cannot read)."""
    entries, errors = manifestmod.parse(doc, where, base, contained=True)
    if errors:
        raise errors[0]
    return entries


def _sweep_dead_temporaries(directory: str, start: str) -> None:
    """Removes ``start*.<pid>.tar.tmp`` files whose process is gone."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if not (name.startswith(start) and name.endswith(".tar.tmp")):
            continue
        try:
            pid = int(name[: -len(".tar.tmp")].rsplit(".", 1)[1])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            unlink_quietly(os.path.join(directory, name))
        except PermissionError:
            continue  # alive, another user's


DESTINATIONS: dict[str, type[Destination]] = {"files": LocalDestination, "s3": S3Destination}  # by backend name
