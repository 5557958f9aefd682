"""``wdsrefresh status``: what a reader would find in a shard directory now, and the ingest backlog.

Every file the source names is judged by the reader's own readiness rule (``storage/local/probe.probe``):
ready (a complete shard, with its sample count), pending (still being written, or written in
place less than ``settle`` seconds ago) or rejected (junk, truncated), each with the reason. A
status is what a reader that rescans the directory now would put in a snapshot: a reader
that watched the directory may have seen a rename and call a file ready a little earlier.
An inbox given to ``status`` is counted as ingest would group it: files, samples (keys),
bytes, the oldest file's age; and the files ingest set aside because their key was published
already (``INBOX/.wdsrefresh/conflicts/``) are named.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from ..core.candidate import Pending, Ready, Rejected
from ..core.options import DEFAULT_SETTLE, Readiness
from ..core.snapshot import ShardInfo
from ..format.names import split_key
from ..storage.backend import backend_for, local_path, make_source
from ..storage.source import NoShardsError, ShardSource
from .ingest import MARKER_EXT, conflicts_dir, scan_inbox


@dataclass(frozen=True)
class FileStatus:
    """One file a source names: ``state`` is "ready", "pending" or "rejected"; ``reason`` says
    why a file is not ready; ``samples`` is known for ready shards."""

    name: str
    state: str
    bytes: int | None
    age_seconds: float | None  # since its last write (mtime)
    samples: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class InboxStatus:
    """Files waiting in an ingest inbox (hidden names and the lock are not inputs)."""

    path: str
    files: int
    samples: int
    bytes: int
    markers: int  # KEY.done files
    oldest_age_seconds: float | None
    conflicts: tuple[str, ...] = ()  # paths of files set aside: their key was published already


@dataclass(frozen=True)
class Status:
    source: str
    settle: float
    files: tuple[FileStatus, ...]
    inbox: InboxStatus | None = None
    at: float = field(default_factory=time.time)

    def of(self, state: str) -> list[FileStatus]:
        return [f for f in self.files if f.state == state]

    @property
    def samples(self) -> int:
        return sum(f.samples or 0 for f in self.of("ready"))

    @property
    def bytes(self) -> int:
        return sum(f.bytes or 0 for f in self.of("ready"))

    @property
    def newest_age_seconds(self) -> float | None:
        ages = [f.age_seconds for f in self.of("ready") if f.age_seconds is not None]
        return min(ages) if ages else None

    def to_dict(self) -> dict:
        """Plain JSON values: totals of the ready shards, then every file by state."""
        ready = self.of("ready")
        return {
            "source": self.source, "at": round(self.at, 3), "settle": self.settle,
            "ready": len(ready), "samples": self.samples, "bytes": self.bytes,
            "newest_age_seconds": _round(self.newest_age_seconds),
            "pending": len(self.of("pending")), "rejected": len(self.of("rejected")),
            "shards": [_file_doc(f) for f in ready],
            "pending_files": [_file_doc(f) for f in self.of("pending")],
            "rejected_files": [_file_doc(f) for f in self.of("rejected")],
            "inbox": None if self.inbox is None else {k: _round(v) if isinstance(v, float) else v
                                                      for k, v in asdict(self.inbox).items()},
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _file_doc(f: FileStatus) -> dict:
    doc = {"name": f.name, "bytes": f.bytes, "age_seconds": _round(f.age_seconds)}
    if f.state == "ready":
        doc["samples"] = f.samples
    else:
        doc["reason"] = f.reason
    return doc


class StatusProbe:
    """Takes statuses of one source, remembering ready shards so unchanged files are not re-read."""

    def __init__(self, target: str, settle: float = DEFAULT_SETTLE, inbox: str | None = None):
        path = local_path(target)
        if path is None:
            raise ValueError(f"{target}: status judges local files only (directories, manifests, globs, brace "
                             f"patterns); for an s3:// prefix, `wdsrefresh ls {target}` lists its shards (samples, "
                             f"bytes, digest, age) and `wdsrefresh verify {target}` re-reads and checks them")
        self.target = path
        self.source: ShardSource = make_source(self.target)
        self.rules = Readiness(with_digest=False, settle=settle)
        self.inbox = inbox
        if inbox is not None and not os.path.isdir(inbox):
            raise ValueError(f"inbox {inbox}: no such directory")
        self.known: dict[str, ShardInfo] = {}

    def _name(self, url: str) -> str:
        if self.source.directory is not None:
            return os.path.relpath(url, self.source.directory)
        return url

    def take(self) -> Status:
        now = time.time()
        try:
            candidates = self.source.candidates()
        except NoShardsError:
            candidates = []
        files, known = [], {}
        for cand in candidates:
            try:
                st = os.stat(cand.path)
            except FileNotFoundError:
                continue
            except OSError as exn:
                files.append(FileStatus(self._name(cand.url), "rejected", None, None, reason=str(exn)))
                continue
            outcome = backend_for(cand.url).ready(cand, self.known, self.rules, st=st)
            size, age = st.st_size, max(0.0, now - st.st_mtime_ns / 1e9)
            name = self._name(cand.url)
            if isinstance(outcome, Ready):
                known[outcome.info.path] = outcome.info
                files.append(FileStatus(name, "ready", size, age, samples=outcome.info.nsamples))
            elif isinstance(outcome, Pending):
                files.append(FileStatus(name, "pending", size, age, reason=outcome.reason))
            elif isinstance(outcome, Rejected):
                files.append(FileStatus(name, "rejected", size, age, reason=_reason(cand.url, outcome.error)))
        self.known = known
        return Status(self.target, self.rules.settle, tuple(files),
                      inbox_status(self.inbox, now) if self.inbox is not None else None, now)


def _reason(url: str, error: BaseException) -> str:
    """The error's text without the file name the status line already shows."""
    text = str(error)
    return text[len(url) + 2:] if text.startswith(url + ": ") else text


def inbox_status(inbox: str, now: float | None = None) -> InboxStatus:
    """What waits in ``inbox``: files, samples (distinct keys), bytes, ``.done`` markers, oldest age."""
    now = time.time() if now is None else now
    keys, files, nbytes, markers, oldest = set(), 0, 0, 0, None
    for name, _path, st in scan_inbox(inbox):
        key, ext = split_key(name)
        if key is not None and ext and ext.lower() == MARKER_EXT:
            markers += 1
            continue
        files += 1
        nbytes += st.st_size
        if key is not None:
            keys.add(key)
        age = max(0.0, now - st.st_mtime_ns / 1e9)
        oldest = age if oldest is None else max(oldest, age)
    aside = tuple(sorted(path for _name, path, _st in scan_inbox(conflicts_dir(inbox))))
    return InboxStatus(inbox, files, len(keys), nbytes, markers, oldest, aside)


def changes(before: Status | None, after: Status) -> Iterator[str]:
    """One line per change from ``before`` to ``after``: a file appearing, changing state (with
    the reason) or disappearing, and the inbox backlog changing."""
    old = {f.name: f for f in before.files} if before is not None else {}
    new = {f.name: f for f in after.files}
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if b is None:
            yield f"gone      {name}"
        elif a is None or a.state != b.state or (b.state == "ready" and (a.bytes, a.samples) != (b.bytes, b.samples)):
            what = f"{b.samples} samples, {_size(b.bytes)}" if b.state == "ready" else b.reason
            yield f"{b.state:<9} {name}: {what}"
    if after.inbox is not None:
        a_inbox, b_inbox = (before.inbox if before is not None else None), after.inbox
        if a_inbox is None or (a_inbox.files, a_inbox.bytes) != (b_inbox.files, b_inbox.bytes):
            yield f"inbox     {describe_inbox(b_inbox)}"
        for path in sorted(set(b_inbox.conflicts) - set(a_inbox.conflicts if a_inbox is not None else ())):
            yield f"conflict  {path}: {CONFLICT_REASON}"


def _size(n: int | None) -> str:
    if n is None:
        return "? bytes"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def format_age(seconds: float | None) -> str:
    """``95`` -> ``"1.6m"``; ``None`` -> ``"-"``: for tables."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


CONFLICT_REASON = "its key was published already; set aside, not published twice"


def describe_inbox(inbox: InboxStatus) -> str:
    oldest = f"; oldest {format_age(inbox.oldest_age_seconds)} old" if inbox.files else ""
    aside = (f"; {len(inbox.conflicts)} files set aside in {conflicts_dir(inbox.path)} (key published already)"
             if inbox.conflicts else "")
    return (f"{inbox.path}: {inbox.files} files waiting ({inbox.samples} samples, {_size(inbox.bytes)}, "
            f"{inbox.markers} .done markers){oldest}{aside}")


def summary(status: Status) -> str:
    """One line: the ready shards, their samples and bytes, the newest one's age, pending, rejected."""
    return (f"{status.source}: {len(status.of('ready'))} ready shards, {status.samples} samples, "
            f"{_size(status.bytes)}; newest {format_age(status.newest_age_seconds)} old; "
            f"{len(status.of('pending'))} pending, {len(status.of('rejected'))} rejected")
