"""Directory-drop ingestion: files dropped into an inbox become samples in published shards.

When a sample is complete:
- **marker**: a file ``KEY.done`` exists; every ``KEY.*`` file is then taken at once (the
  marker itself is not packed, and is removed with the sample's files). With
  ``require_done`` this is the only rule. A marker left without files (its sample was
  taken by settling before the marker arrived) is removed once it has settled.
- **settled**: otherwise, every file of the sample was closed after its last write (seen by
  watchdog: a write, or the creation of an empty file, marks it open until its close) and
  its size, mtime and inode have not changed for ``settle`` seconds. Files found while no
  events were watched (at start-up) are judged by the settle time alone.
A close seen by the watcher only makes a file eligible: it is complete once it has also been
unchanged for ``settle`` seconds (or its marker exists). A file some process still holds open
for writing is never complete by time, however long unchanged (a read lease tells, where the
file system grants one: ``lease.py``).
Safe producer patterns: write under a hidden name (``.name``, ignored) and rename into
place; or write the files in place and then create ``KEY.done`` (with ``require_done``
when a writer may pause longer than ``settle``).

A key is published once: a complete sample whose key a shard of OUT already holds (read at
start-up through ``keys.py``, then kept as shards are published) is never packed. Its files
(and marker) are moved to ``INBOX/.wdsrefresh/conflicts/`` under their names relative to the
inbox (``name.1``, ``name.2``, ... when taken), with a WARNING naming each; ``wdsrefresh
status --inbox`` lists them. That is what becomes of a file rewritten, or re-created, after its
sample was published (a writer that closed it and paused longer than ``settle``), and of a
key that another tool packed into OUT before. The move is a rename within the inbox: a kill
leaves each file either in the inbox (judged again) or set aside.

Guarantee (crash safety): an input is removed from the inbox (or moved to ``archive``) only
after the shard holding it is durable under its final name and listed in the manifest. Each
publication is journaled (``OUT/.wdsrefresh/``) before the shard is renamed into place; a
restart first completes or rolls back the journaled step. So after kill -9 at any moment and
a restart, every input is in exactly one published shard, or still in the inbox.
Input files are identified by (inode, size, mtime): a file re-created or rewritten under the
same name after it was packed is a new input, never removed by mistake.

One ingest at a time owns an inbox: it holds ``INBOX/.wdsrefresh-ingest.lock`` (a hidden
name, never packed), whatever its output directory. The inbox must exist; OUT and the
archive may be neither the inbox nor inside it, nor contain it.

OUT may be an ``s3://bucket/prefix/`` URL. Each shard is then written to a local temporary
file, numbered by the store's counter (``destination.py``), journaled, uploaded whole (a
conditional PUT that never replaces an object), and described by a fragment
``manifest.d/part-<inbox tag>-<number>.json`` carrying its ETag; only then are its inputs
removed. The fragments are compacted into ``manifest.json`` (a conditional PUT) every
``COMPACT_EVERY`` shards and when the ingest stops. The journal and the temporary files live
on local disk, in ``--journal-dir`` (default ``INBOX/.wdsrefresh/ingest-<tag of OUT>/``, a
hidden name the inbox scan skips). After a kill, the restart finds each journaled shard: in
the store with the journaled digest (read back once), its publication is completed; absent,
it is rolled back and its inputs are packed again later.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import xxhash

from ..errors import WdsRefreshError
from ..format import manifest as manifestmod
from ..format.manifest import ManifestEntry
from ..format.names import split_key
from ..format.tarwriter import TarWriteError
from ..storage.local import Change, new_watcher, open_for_writing
from .pack import (
    DEFAULT_MAXCOUNT, DEFAULT_MAXSIZE, DEFAULT_PREFIX, InputId, Member, PackError, Sample, check_local, check_name,
    check_prefix, paths_overlap, plan_shards, write_shard, WrittenShard,
)
from .destination import DestinationError, open_destination
from .keys import directory_keys, record_shard
from .publish import (
    PRIVATE_DIR, add_to_manifest, current_entries, fsync_dir_named, next_number, out_lock, rename_without_replacing,
    shard_name,
)

log = logging.getLogger("wdsrefresh")

INBOX_LOCK_NAME = ".wdsrefresh-ingest.lock"
MARKER_EXT = "done"
JOURNAL_VERSION = 1
COMPACT_EVERY = 32  # shards published into an object store between compactions of their fragments
CONFLICTS_DIR = f"{PRIVATE_DIR}/conflicts"  # under the inbox: samples whose key was published already


def conflicts_dir(inbox: str) -> str:
    """Where ingest sets aside the files of samples whose key OUT already holds."""
    return os.path.join(inbox, CONFLICTS_DIR)


class IngestError(WdsRefreshError, RuntimeError):
    """Ingestion cannot start or continue; the message says why."""


@dataclass
class IngestConfig:
    inbox: str
    out: str
    maxcount: int = DEFAULT_MAXCOUNT
    maxsize: int = DEFAULT_MAXSIZE
    settle: float = 2.0
    flush: float = 30.0
    archive: str | None = None
    prefix: str = DEFAULT_PREFIX
    require_done: bool = False
    poll: float = 5.0
    storage_options: dict | None = None  # for an s3:// OUT (remote.store.Store's options)
    journal_dir: str | None = None  # for an s3:// OUT: where the local journal lives


@dataclass
class _Found:
    """One scan's view of a sample: its data files and its marker, with their stats."""

    files: dict[str, os.stat_result] = field(default_factory=dict)
    marker: tuple[str, os.stat_result] | None = None


def scan_inbox(inbox: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """``(name relative to inbox, path, lstat)`` of every visible regular file under inbox."""
    stack = [("", inbox)]
    while stack:
        rel, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append((rel + entry.name + "/", entry.path))
            elif entry.is_file(follow_symlinks=False):
                yield rel + entry.name, entry.path, st


class _Tracker:
    """Remembers when each file last changed and which files are open for writing.

    A file marked as being written (a write event without its close event) still counts as
    complete once unchanged for ``stale`` seconds: close events can be lost (inotify queue
    overflow) and attribute changes arrive as writes without a close.
    """

    def __init__(self, settle: float):
        self.settle = settle
        self.stale = max(10.0, 10 * settle)
        self.since: dict[str, tuple[tuple[int, int, int], float]] = {}
        self.writing: set[str] = set()
        self.lock = threading.Lock()
        self.warned: set[tuple[str, tuple[int, int, int]]] = set()

    def settled_at(self, path: str, st: os.stat_result, now: float) -> float:
        """The monotonic time at which the file counts as complete, if it does not change; never
        while a process holds it open for writing (asked once the time has come: lease.py)."""
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self.lock:
            old = self.since.get(path)
            if old is None or old[0] != sig:
                self.since[path] = old = (sig, now)
            writing = path in self.writing
        wall_age = time.time() - st.st_mtime_ns / 1e9
        at = old[1] + self.stale if writing else min(old[1] + self.settle, now + max(0.0, self.settle - wall_age))
        if at <= now and open_for_writing(path, self.settle):
            return now + self.settle  # its writer may still write: look again then
        return at

    def warn_once(self, path: str, st: os.stat_result, message: str) -> None:
        key = (path, (st.st_ino, st.st_size, st.st_mtime_ns))
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s", message)

    def forget(self, paths: Sequence[str]) -> None:
        with self.lock:
            for p in paths:
                self.since.pop(p, None)


def _input_id(path: str, st: os.stat_result) -> InputId:
    return InputId(path, st.st_ino, st.st_size, st.st_mtime_ns)


def _same_file(ident: dict) -> bool:
    try:
        st = os.lstat(ident["path"])
    except FileNotFoundError:
        return False
    return (st.st_ino, st.st_size, st.st_mtime_ns) == (ident["ino"], ident["size"], ident["mtime_ns"])


class Ingester:
    """Moves complete samples from an inbox into published shards; see the module docstring."""

    def __init__(self, config: IngestConfig, on_publish: Callable[[ManifestEntry], None] | None = None):
        """``on_publish`` is called with each shard's manifest entry once the shard is published
        and its inputs removed (the command line prints a line)."""
        self.cfg = config
        self.on_publish = on_publish
        self.inbox = os.path.abspath(config.inbox)
        self.tag = xxhash.xxh3_64_hexdigest(os.path.realpath(self.inbox).encode())
        try:
            self.dest = open_destination(config.out, config.storage_options)
        except (DestinationError, ValueError) as exn:
            raise IngestError(str(exn)) from None
        if self.dest.remote:
            self.out = self.dest.url
            self.journal_dir = os.path.abspath(config.journal_dir or os.path.join(
                self.inbox, PRIVATE_DIR, "ingest-" + xxhash.xxh3_64_hexdigest(self.out.encode())))
        else:
            if config.journal_dir:
                raise IngestError("--journal-dir is for an s3:// output; a local one keeps its journal in "
                                  f"{os.path.join(config.out, PRIVATE_DIR)}")
            self.out = os.path.abspath(config.out)
            self.journal_dir = os.path.join(self.out, PRIVATE_DIR, f"ingest-{self.tag}")
        self._unmerged = 0  # fragments written into an object store since the last compaction
        self.tracker = _Tracker(config.settle)
        self._wake_r, self._wake_w = _nonblocking_pipe()  # stop() wakes the loop, even from a signal handler
        self._counter = 0
        self._lock_fd: int | None = None
        self._oldest_ready: float | None = None
        self.held: dict[str, str] = {}  # {key: shard} of every sample OUT holds (filled by open())
        self.watching = threading.Event()  # set once events are being received
        self.stopping = threading.Event()

    # ---- start-up: exclusive ownership of the inbox, recovery ----------------------------

    def open(self) -> None:
        """Checks the directories, takes the inbox lock, then completes or rolls back any
        journaled publication. Raises IngestError (naming the directory) before changing
        anything when the inbox is missing or overlaps OUT or the archive."""
        self._check_directories()
        self._lock_inbox()
        try:
            for d in ([] if self.dest.remote else [self.out]) + [self.journal_dir]:
                os.makedirs(d, exist_ok=True)
            if self.cfg.archive:
                os.makedirs(self.cfg.archive, exist_ok=True)
                if os.stat(self.cfg.archive).st_dev != os.stat(self.inbox).st_dev:
                    raise IngestError(f"archive {self.cfg.archive} must be on the same file system as {self.inbox}")
            self.recover()
            self.held = directory_keys(self.dest)
        except BaseException:
            self.close()
            raise

    def _check_directories(self) -> None:
        local = [self.cfg.inbox, self.cfg.archive or ""] + ([] if self.dest.remote else [self.cfg.out])
        for path in local:
            try:
                check_local(path)
            except PackError as exn:
                raise IngestError(str(exn)) from None
        try:
            check_prefix(self.cfg.prefix)
        except PackError as exn:
            raise IngestError(str(exn)) from None
        if not os.path.isdir(self.inbox):
            what = "not a directory" if os.path.exists(self.inbox) else "no such directory"
            raise IngestError(f"inbox {self.cfg.inbox}: {what} (create it first; ingest does not)")
        inbox = os.path.realpath(self.inbox)
        for role, path in (("output directory", None if self.dest.remote else self.cfg.out),
                           ("archive", self.cfg.archive)):
            if path and paths_overlap(inbox, os.path.realpath(path)):
                raise IngestError(f"{role} {path} and inbox {self.cfg.inbox} overlap (one is, or is inside, the "
                                  f"other): ingest would take its own files as inputs")
        if self.cfg.archive and not self.dest.remote and paths_overlap(os.path.realpath(self.cfg.archive),
                                                                        os.path.realpath(self.out)):
            raise IngestError(f"archive {self.cfg.archive} and output directory {self.cfg.out} overlap: "
                              "archived inputs would sit among the shards")

    def _lock_inbox(self) -> None:
        """Takes ``INBOX/.wdsrefresh-ingest.lock`` (removed again by ``close``)."""
        path = os.path.join(self.inbox, INBOX_LOCK_NAME)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise IngestError(f"another ingest is already running on {self.inbox} (it holds {path})") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)  # the holder removed it while we opened it: lock the new one

    def close(self) -> None:
        """Releases the inbox (removing its lock file)."""
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._lock_fd is not None:
            try:
                os.unlink(os.path.join(self.inbox, INBOX_LOCK_NAME))
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Ingester:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stop(self) -> None:
        """Makes ``run_forever`` publish what is complete and return (safe from a signal handler)."""
        self.stopping.set()
        try:
            os.write(self._wake_w, b"!")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def recover(self) -> None:
        """Finishes each journaled publication whose shard was renamed; rolls back the others."""
        if self.dest.remote:
            self._recover_remote()
            return
        with out_lock(self.out):
            for name in sorted(os.listdir(self.journal_dir)):
                path = os.path.join(self.journal_dir, name)
                if name.startswith("_tmp."):
                    os.unlink(path)
                    continue
                doc = _load_journal(path)
                if _renamed(os.path.join(self.out, doc["tmp"]), os.path.join(self.out, doc["shard"])):
                    log.info("recovery: completing publication of %s", doc["shard"])
                    add_to_manifest(self.out, current_entries(self.out), [_entry_from(doc)])
                    self._remove_inputs(doc["inputs"])
                else:
                    log.info("recovery: rolling back unpublished %s", doc["shard"])
                os.unlink(path)
                fsync_dir_named(self.journal_dir)
            self._sweep_temporaries()

    def _recover_remote(self) -> None:
        """Finishes each journaled publication whose object is in the store with the journaled
        digest; rolls back the others (their inputs stay in the inbox); then compacts."""
        for name in sorted(os.listdir(self.journal_dir)):
            path = os.path.join(self.journal_dir, name)
            if name.startswith(("_tmp.", ".ingest-")):
                os.unlink(path)
                continue
            doc = _load_journal(path)
            entry = _entry_from(doc)
            published = self._published_remote(entry)
            if published is not None:
                log.info("recovery: completing publication of %s", self.dest.location(entry.url))
                self.dest.write_fragment(self.tag, _number(entry.url), [published])
                self._remove_inputs(doc["inputs"])
            else:
                log.info("recovery: rolling back unpublished %s", self.dest.location(entry.url))
                self.dest.sweep(self.tag, [entry.url])  # an upload in parts the kill cut short
            os.unlink(path)
            fsync_dir_named(self.journal_dir)
        self.dest.commit(None)

    def _published_remote(self, entry: ManifestEntry) -> ManifestEntry | None:
        """The entry (with its ETag) of the journaled shard if it is in the store, else None."""
        if not self.dest.exists(entry.url):
            return None
        found, complete = self.dest.indexed(entry.url)
        if not complete or found.digest != entry.digest:
            raise IngestError(f"{self.dest.location(entry.url)}: journaled in {self.journal_dir} with digest "
                              f"{entry.digest}, the store holds other bytes ({found.digest}); not removing its "
                              "inputs: check that no other writer uses this prefix without reserving numbers")
        return found

    def _sweep_temporaries(self) -> None:
        for name in os.listdir(self.out):
            if name.startswith(f".ingest-{self.tag}-"):
                os.unlink(os.path.join(self.out, name))

    # ---- finding complete samples --------------------------------------------------------

    def ready(self, now: float) -> tuple[list[tuple[Sample, list[InputId]]], float | None]:
        """Complete samples, in key order, with every input each one consumes; and the
        earliest time at which a sample still settling may become complete."""
        found: dict[str, _Found] = {}
        for name, path, st in scan_inbox(self.inbox):
            key, ext = split_key(name)
            if key is None or not ext:
                self.tracker.warn_once(path, st, f"{path}: name has no extension; left in the inbox")
                continue
            if ext.lower() == MARKER_EXT:
                found.setdefault(key, _Found()).marker = (path, st)
            else:
                found.setdefault(key, _Found()).files[name] = st
        out, later = [], None
        for key in sorted(found):
            f = found[key]
            at = self._complete_at(f, now)
            if at is None:
                continue
            if at > now:
                later = at if later is None else min(later, at)
            elif not f.files:
                self._drop_orphan_marker(*f.marker)
            elif key in self.held:
                self._set_aside(key, f)
            elif (sample := self._sample(key, f)) is not None:
                out.append(sample)
        return out, later

    @staticmethod
    def _drop_orphan_marker(path: str, st: os.stat_result) -> None:
        """Removes a settled marker without files: its sample was taken by settling first."""
        if _same_file(_as_dict(_input_id(path, st))):
            log.info("%s: removing marker whose sample was already published", path)
            os.unlink(path)

    def _set_aside(self, key: str, f: _Found) -> None:
        """Moves the files of a complete sample whose key is published already to the conflicts
        directory, each with a WARNING; a file that changed since the scan is judged again later."""
        found = [(os.path.join(self.inbox, n), st) for n, st in sorted(f.files.items())]
        shard = self.dest.location(self.held[key])
        moved = []
        for path, st in found + ([f.marker] if f.marker is not None else []):
            if not _same_file(_as_dict(_input_id(path, st))):
                continue
            dest = _free_name(os.path.join(conflicts_dir(self.inbox), os.path.relpath(path, self.inbox)))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.rename(path, dest)
            fsync_dir_named(os.path.dirname(dest))
            fsync_dir_named(os.path.dirname(path))
            moved.append(path)
            log.warning("%s: sample %r is published already (in %s); moved to %s instead of publishing the key "
                        "twice. A sample's files must not change once complete: write them under a hidden name "
                        "and rename them into place, or end the sample with %s.%s (and --require-done); give a "
                        "new version a new key", path, key, shard, dest, key, MARKER_EXT)
        self.tracker.forget(moved)

    def _complete_at(self, f: _Found, now: float) -> float | None:
        """When the sample counts as complete (a marker alone: when the marker settles)."""
        if f.marker is not None:
            return now if f.files else self.tracker.settled_at(f.marker[0], f.marker[1], now)
        if self.cfg.require_done:
            return None
        return max(self.tracker.settled_at(os.path.join(self.inbox, n), st, now) for n, st in f.files.items())

    def _sample(self, key: str, f: _Found) -> tuple[Sample, list[InputId]] | None:
        members, exts = [], {}
        for name, st in sorted(f.files.items()):
            path = os.path.join(self.inbox, name)
            ext = split_key(name)[1].lower()
            problem = self._problem(name, path, ext, exts)
            if problem:
                self.tracker.warn_once(path, st, f"{problem}; sample {key!r} left in the inbox")
                return None
            exts[ext] = path
            members.append(Member(name, path, st.st_size))
        inputs = [_input_id(m.path, f.files[m.name]) for m in members]
        if f.marker is not None:
            inputs.append(_input_id(*f.marker))
        return Sample(key, tuple(members)), inputs

    @staticmethod
    def _problem(name: str, path: str, ext: str, exts: dict[str, str]) -> str | None:
        """Why the file ``path`` cannot be packed (a message naming it), or None."""
        if ext in exts:
            return f"{path}: duplicate key: {exts[ext]} is the same member .{ext}"
        try:
            check_name(name, path)
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        except PackError as exn:
            return str(exn)
        except OSError as exn:
            return f"{path}: cannot be read ({exn.strerror})"
        return None

    # ---- publishing ----------------------------------------------------------------------

    def publish(self, batch: Sequence[tuple[Sample, list[InputId]]]) -> ManifestEntry:
        """Writes one shard from ``batch``, publishes it, then removes (or archives) its inputs."""
        if self.dest.remote:
            return self._publish_remote(batch)
        tmp_name = f".ingest-{self.tag}-{os.getpid()}-{self._counter + 1}.tar.tmp"
        written, inputs = self._write(batch, os.path.join(self.out, tmp_name))
        with out_lock(self.out):
            entries = current_entries(self.out)
            name = shard_name(self.cfg.prefix, next_number(self.out, self.cfg.prefix, [e.url for e in entries]))
            entry = written.entry(name)
            journal = os.path.join(self.journal_dir, name + ".json")
            manifestmod.write_json_atomic(journal, _journal_doc(entry, tmp_name, inputs))
            rename_without_replacing(written.tmp_path, os.path.join(self.out, name))
            fsync_dir_named(self.out)
            add_to_manifest(self.out, entries, [entry])
            self._remove_inputs(inputs)
            os.unlink(journal)
        self._hold_keys(name, batch)
        self.tracker.forget([i["path"] for i in inputs])
        log.info("published %s: %d samples, %d bytes", name, entry.nsamples, entry.filesize)
        if self.on_publish is not None:
            self.on_publish(entry)
        return entry

    def _write(self, batch: Sequence[tuple[Sample, list[InputId]]], tmp_path: str) -> tuple[WrittenShard, list[dict]]:
        """The batch's shard, written durably to ``tmp_path``, and every input it consumes
        (its files, and markers, which are not packed)."""
        self._counter += 1
        written = write_shard([s for s, _ in batch], tmp_path)
        packed = {i.path for i in written.inputs}
        markers = [i for _, ids in batch for i in ids if i.path not in packed]
        return written, [_as_dict(i) for i in written.inputs + tuple(markers)]

    def _publish_remote(self, batch: Sequence[tuple[Sample, list[InputId]]]) -> ManifestEntry:
        """``publish`` into an object store: journal, upload, fragment, then the inputs go."""
        tmp_name = f".ingest-{os.getpid()}-{self._counter + 1}.tar.tmp"
        written, inputs = self._write(batch, os.path.join(self.journal_dir, tmp_name))
        name = self.dest.reserve_names(self.cfg.prefix, 1)[0]
        journal = os.path.join(self.journal_dir, name + ".json")
        manifestmod.write_json_atomic(journal, _journal_doc(written.entry(name), tmp_name, inputs))
        entry = self.dest.publish(written.tmp_path, written.entry(name))
        if entry is None:
            raise IngestError(f"{self.dest.location(name)}: exists already, though its number was just taken "
                              "from the store's counter: another writer uses this prefix without reserving numbers")
        self.dest.write_fragment(self.tag, _number(name), [entry])
        self._remove_inputs(inputs)
        os.unlink(journal)
        self._unmerged += 1
        if self._unmerged >= COMPACT_EVERY:
            self.compact()
        self._hold_keys(name, batch)
        self.tracker.forget([i["path"] for i in inputs])
        log.info("published %s: %d samples, %d bytes", self.dest.location(name), entry.nsamples, entry.filesize)
        if self.on_publish is not None:
            self.on_publish(entry)
        return entry

    def _hold_keys(self, name: str, batch: Sequence[tuple[Sample, list[InputId]]]) -> None:
        """Remembers the keys of the shard ``name`` just published, and records them beside it
        (``keys.py``) so that the next start need not read the shard."""
        keys = [s.key for s, _ in batch]
        self.held.update(dict.fromkeys(keys, name))
        try:
            record_shard(self.dest, name, keys)
        except OSError as exn:  # only a cache: the next start reads the shard instead
            log.debug("%s: keys not recorded (%s)", self.dest.location(name), exn)

    def compact(self) -> None:
        """Merges the fragments of an object-store output into its manifest.json."""
        if self.dest.remote and self._unmerged:
            self.dest.commit(None)
            self._unmerged = 0

    def _remove_inputs(self, inputs: Sequence[dict]) -> None:
        dirs = set()
        for ident in inputs:
            if not _same_file(ident):
                continue
            if self.cfg.archive:
                rel = os.path.relpath(ident["path"], self.inbox)
                dest = _free_name(os.path.join(self.cfg.archive, rel))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.rename(ident["path"], dest)
                dirs.add(os.path.dirname(dest))
            else:
                os.unlink(ident["path"])
            dirs.add(os.path.dirname(ident["path"]))
        for d in dirs:
            fsync_dir_named(d)

    # ---- loops ---------------------------------------------------------------------------

    def _batches(self, ready: list) -> list[list]:
        by_key = {s.key: ids for s, ids in ready}
        shards = plan_shards([s for s, _ in ready], self.cfg.maxcount, self.cfg.maxsize)
        return [[(s, by_key[s.key]) for s in shard] for shard in shards]

    def step(self, final: bool) -> float | None:
        """Publishes full shards of complete samples (all of them when ``final``, or when the
        oldest has waited ``flush`` seconds). Returns when a settling sample may be ready."""
        now = time.monotonic()
        ready, later = self.ready(now)
        if not ready:
            self._oldest_ready = None
            return later
        if self._oldest_ready is None:
            self._oldest_ready = now
        batches = self._batches(ready)
        if not (final or now - self._oldest_ready >= self.cfg.flush or len(batches[-1]) >= self.cfg.maxcount):
            batches = batches[:-1]  # every batch but the last is full by construction
        else:
            self._oldest_ready = None
        try:
            for batch in batches:
                try:
                    self.publish(batch)
                except (FileNotFoundError, TarWriteError) as exn:
                    log.warning("%s; will retry at the next scan", exn)
                    return later
        finally:
            if final:
                self.compact()
        return later

    def run_once(self) -> None:
        """Publishes every sample complete now, waiting for those still settling (at most
        ``settle`` seconds); leaves files still being written for the next run."""
        later = self.step(final=True)
        limit = time.monotonic() + self.cfg.settle  # files seen by that first scan settle by then
        while later is not None and later <= limit:
            time.sleep(max(0.0, later - time.monotonic()))
            later = self.step(final=True)

    def run_forever(self) -> None:
        """Watches the inbox until ``stop()``; publishes as samples become complete."""
        watcher = new_watcher("watchdog", recursive=True)  # watchdog watches subdirectories itself
        watcher.add(self.inbox)
        self.watching.set()
        log.info("watching %s; publishing into %s", self.inbox, self.out)
        try:
            while not self.stopping.is_set():
                self._track(watcher.read())
                later = self.step(final=False)
                deadlines = [self.cfg.poll]
                if later is not None:
                    deadlines.append(later - time.monotonic())
                if self._oldest_ready is not None:
                    deadlines.append(self._oldest_ready + self.cfg.flush - time.monotonic())
                self._wait([watcher.fileno(), self._wake_r], max(0.01, min(deadlines)))
            self.step(final=True)
        finally:
            self.watching.clear()
            watcher.close()

    def _track(self, changes: list[Change]) -> None:
        """Marks files open for writing (a write, or an empty file created) until their close."""
        tracker = self.tracker
        with tracker.lock:
            for change in changes:
                if change.path is None:
                    continue
                if change.kind == "modified" or (change.kind == "created" and _empty(change.path)):
                    tracker.writing.add(change.path)
                elif change.kind in ("closed", "deleted", "moved_from", "moved_to"):
                    tracker.writing.discard(change.path)

    def _wait(self, fds: list[int], timeout: float) -> None:
        ready, _, _ = select.select(fds, [], [], timeout)
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass


def _nonblocking_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _empty(path: str) -> bool:
    try:
        return os.stat(path).st_size == 0
    except FileNotFoundError:
        return False


def _renamed(tmp: str, shard: str) -> bool:
    """Whether a journaled shard reached its name: gone from ``tmp`` (renamed), or linked to
    ``shard`` and not yet unlinked (see ``rename_without_replacing``)."""
    try:
        st = os.stat(shard)
    except FileNotFoundError:
        return False
    try:
        return os.path.samestat(os.stat(tmp), st)
    except FileNotFoundError:
        return True


def _as_dict(i: InputId) -> dict:
    return {"path": i.path, "ino": i.ino, "size": i.size, "mtime_ns": i.mtime_ns}


def _journal_doc(entry: ManifestEntry, tmp_name: str, inputs: list[dict]) -> dict:
    return {"version": JOURNAL_VERSION, "shard": entry.url, "tmp": tmp_name, "entry": entry.to_json(), "inputs": inputs}


def _load_journal(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("version") != JOURNAL_VERSION:
        raise IngestError(f"{path}: unknown ingest journal version {doc.get('version')!r}")
    return doc


def _number(name: str) -> int:
    """The number of shard ``PREFIX-NNNNNN.tar``."""
    return int(name.rsplit("-", 1)[1].split(".", 1)[0])


def _entry_from(doc: dict) -> ManifestEntry:
    e = doc["entry"]
    return ManifestEntry(e["url"], e["nsamples"], e["filesize"], e["digest"], bytes.fromhex(e["blocks"]),
                         e.get("mtime_ns"))


def _free_name(path: str) -> str:
    candidate, n = path, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate

