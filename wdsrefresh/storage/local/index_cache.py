"""A persistent cache of what indexing a shard found (count and digests), so a restarted job
does not read again the shards it indexed before.

An entry applies to one version of one file: it is keyed by the file's real path and by its
device, inode, size, mtime_ns and ctime_ns. Any write, rename, ``touch`` or ``chmod`` changes
the ctime, and the ctime cannot be set back from user space, so an entry can never describe
other bytes than the ones indexed. Only complete shards indexed with their digests
(xxh3_128 and 4 MiB block digests) are stored.

Layout: one JSON file per directory of shards, ``<cache dir>/index-v1/<hash of the
directory's real path>.json``, under the user's cache directory (``$XDG_CACHE_HOME/wdsrefresh``,
by default ``~/.cache/wdsrefresh``). Safe under concurrent jobs: a file is replaced whole
(temporary name, then rename) after merging what another job wrote meanwhile, under a lock
file; readers never see part of one. Bounded: once the files add up to more than
``DEFAULT_LIMIT`` bytes, the least recently written ones are removed. Every field of a cache
file is checked as hostile: a file or entry that is unreadable, malformed or inconsistent with
the file it names is a miss (the shard is indexed from the file), never an error.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time

from ...format.atomic import write_atomic
from ...format.digest import BLOCK_SIZE, DEFAULT_ALGO
from ...core.snapshot import ShardInfo

log = logging.getLogger("wdsrefresh")

FORMAT = "wdsrefresh-index-cache"
VERSION = 1
DEFAULT_LIMIT = 512 << 20  # bytes of cache files, all directories together
_FLUSH_EVERY = 30.0  # seconds: new entries found by the background indexer are written at most this often
_DIGEST_RE = re.compile(r"xxh3_128:[0-9a-f]{32}\Z")
_BLOCK_DIGEST_HEX = 16
_HEADER = 512  # a sample takes a tar header at least


def default_directory() -> str:
    """``$XDG_CACHE_HOME/wdsrefresh``, else ``~/.cache/wdsrefresh``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wdsrefresh")


def cache_directory(setting: bool | str | os.PathLike | None) -> str | None:
    """The cache directory an ``index_cache=`` argument names: True the default, False/None none."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return default_directory()
    return os.fspath(setting)


class IndexCache:
    """Entries of the shard directories one process indexes, loaded on first use per directory."""

    def __init__(self, directory: str, limit: int = DEFAULT_LIMIT):
        self.root = os.path.join(directory, f"index-v{VERSION}")
        self.limit = limit
        self._dirs: dict[str, _DirEntries] = {}

    def get(self, info: ShardInfo, st: os.stat_result, max_sample_bytes: int) -> ShardInfo | None:
        """``info`` completed with the cached count and digests, when an entry describes this very
        version of the file (and was indexed under a member size limit no larger); else None."""
        parent, name = os.path.split(info.path)
        entry = self._entries(parent).get(name)
        if entry is None or entry[:5] != _version(st) or entry[5] > max_sample_bytes:
            return None
        nsamples, digest, blocks = _checked(entry, st.st_size)
        if nsamples is None:
            return None
        return ShardInfo(info.url, info.path, info.size, info.mtime_ns, info.inode, info.device, nsamples, digest,
                         blocks, name=info.name)

    def put(self, info: ShardInfo, st: os.stat_result, max_sample_bytes: int) -> None:
        """Records what indexing ``info`` (a file stated as ``st``) found."""
        if info.digest is None or info.blocks is None or not info.digest.startswith(DEFAULT_ALGO + ":"):
            return
        if info.block_size != BLOCK_SIZE or info.nsamples is None:
            return
        parent, name = os.path.split(info.path)
        self._entries(parent).put(name, [*_version(st), max_sample_bytes, info.nsamples, info.digest,
                                         info.blocks.hex()])

    def forget(self, path: str) -> None:
        """The file at ``path`` is gone: its entry is dropped at the next write."""
        parent, name = os.path.split(path)
        if parent in self._dirs:
            self._dirs[parent].forget(name)

    def flush(self, force: bool = True) -> None:
        """Writes the directories with new entries (``force=False``: only if the last write was
        long enough ago); then keeps the cache under its limit."""
        wrote = False
        for entries in self._dirs.values():
            if entries.dirty and (force or time.monotonic() - entries.written >= _FLUSH_EVERY):
                wrote |= entries.write()
        if wrote:
            _bound(self.root, self.limit)

    def _entries(self, parent: str) -> _DirEntries:
        entries = self._dirs.get(parent)
        if entries is None:
            digest = hashlib.sha256(os.fsencode(parent)).hexdigest()[:32]
            entries = self._dirs[parent] = _DirEntries(parent, os.path.join(self.root, digest + ".json"))
        return entries


def _version(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _checked(entry: list, size: int) -> tuple[int | None, str | None, bytes | None]:
    """(nsamples, digest, blocks) of an entry whose every field is consistent with a file of
    ``size`` bytes; (None, None, None) otherwise."""
    nsamples, digest, blocks_hex = entry[6], entry[7], entry[8]
    nblocks = -(-size // BLOCK_SIZE)
    if not (type(nsamples) is int and 0 <= nsamples <= size // _HEADER):
        return None, None, None
    if not (isinstance(digest, str) and _DIGEST_RE.match(digest)):
        return None, None, None
    if not (isinstance(blocks_hex, str) and len(blocks_hex) == nblocks * _BLOCK_DIGEST_HEX):
        return None, None, None
    try:
        blocks = bytes.fromhex(blocks_hex)
    except ValueError:
        return None, None, None
    return nsamples, digest, blocks


class _DirEntries:
    """The cached entries of one directory: name -> [device, inode, size, mtime_ns, ctime_ns,
    max_sample_bytes, nsamples, digest, blocks as hex]."""

    _WIDTH = 9

    def __init__(self, directory: str, path: str):
        self.directory = directory
        self.path = path
        self.entries = self._load()
        self.added: dict[str, list] = {}
        self.gone: set[str] = set()
        self.written = time.monotonic()

    @property
    def dirty(self) -> bool:
        return bool(self.added or self.gone)

    def get(self, name: str) -> list | None:
        entry = self.added.get(name) or self.entries.get(name)
        return entry if entry is not None and _well_formed(entry) else None

    def put(self, name: str, entry: list) -> None:
        if self.entries.get(name) != entry:
            self.added[name] = entry
            self.gone.discard(name)

    def forget(self, name: str) -> None:
        if name in self.entries or name in self.added:
            self.gone.add(name)
            self.added.pop(name, None)

    def _load(self) -> dict[str, list]:
        """The entries on disk; an unreadable or malformed file is no entries (a miss for each shard)."""
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size > DEFAULT_LIMIT:
                    return {}
                doc = json.loads(f.read())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exn:
            log.info("index cache %s is unreadable (%s); its shards are indexed from their files", self.path, exn)
            return {}
        if not (isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("version") == VERSION
                and doc.get("directory") == self.directory and isinstance(doc.get("entries"), dict)):
            log.info("index cache %s is not one of this directory's (version %d); ignored", self.path, VERSION)
            return {}
        return doc["entries"]

    def write(self) -> bool:
        """Merges with what another job wrote since, and replaces the file whole; whether it wrote."""
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with _locked(self.path + ".lock"):
                merged = self._load()
                merged.update(self.added)
                for name in self.gone:
                    merged.pop(name, None)
                doc = {"format": FORMAT, "version": VERSION, "directory": self.directory, "entries": merged}
                write_atomic(self.path, json.dumps(doc, separators=(",", ":")).encode())
        except OSError as exn:
            log.info("cannot write the index cache %s (%s); shards will be indexed again after a restart",
                     self.path, exn)
            return False
        self.entries, self.added, self.gone = merged, {}, set()
        self.written = time.monotonic()
        return True


def _well_formed(entry: object) -> bool:
    if type(entry) is not list or len(entry) != _DirEntries._WIDTH:
        return False
    device, inode, size, mtime_ns, ctime_ns, limit = entry[:6]
    return (type(device) is int and type(inode) is int and type(size) is int and type(mtime_ns) is int
            and type(ctime_ns) is int and type(limit) is int)


class _locked:
    """An exclusive lock file (flock) for a read-merge-write; best effort where flock fails."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _bound(root: str, limit: int) -> None:
    """Removes the least recently written cache files until the rest fit under ``limit`` bytes."""
    try:
        files = [(e.stat().st_mtime_ns, e.stat().st_size, e.path) for e in os.scandir(root)
                 if e.name.endswith(".json") and e.is_file()]
    except OSError:
        return
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= limit:
            return
        try:
            os.unlink(path)
            total -= size
            os.unlink(path + ".lock")
        except OSError:
            pass
