"""Where the names of local shard files come from: a directory, a glob, a brace pattern, a
manifest, or a file; ``local_source`` picks one for a path.

A source only names candidate files; statting, indexing and deciding which are ready is the
snapshot's job. Listing order is sorted, so a snapshot's order is deterministic.
"""

from __future__ import annotations

import glob as globmod
import logging
import os

import braceexpand

from ...core.candidate import Candidate
from ...format import manifest as manifestmod
from ...format.names import is_shard_name, is_temporary
from ..source import ListSource, NoShardsError, ShardSource

log = logging.getLogger("wdsrefresh")


class DirectorySource(ShardSource):
    """The shards in a directory; counts and digests come from its manifest.json when it has one."""

    def __init__(self, path: str, recursive: bool = False):
        self.path = os.fspath(path)
        self.recursive = recursive
        self._manifest_cache: tuple[tuple | None, dict] = (None, {})

    def candidates(self) -> list[Candidate]:
        if not os.path.isdir(self.path):
            raise NoShardsError(f"shard directory {self.path!r} does not exist")
        # One resolution of each directory's real path, not one per file; "" for a symlinked
        # file: the probe resolves it.
        listed: list[tuple[str, str]] = []  # (path, real path)
        if self.recursive:
            for root, dirs, files in os.walk(self.path, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not is_temporary(d))
                real_root = os.path.realpath(root)
                for f in files:
                    if is_shard_name(f):
                        path = os.path.join(root, f)
                        listed.append((path, "" if os.path.islink(path) else os.path.join(real_root, f)))
        else:
            real_root = os.path.realpath(self.path)
            with os.scandir(self.path) as entries:
                listed = [(e.path, "" if e.is_symlink() else os.path.join(real_root, e.name))
                          for e in entries if is_shard_name(e.name) and not e.is_dir()]
        listed.sort()
        known = self._manifest_entries()
        return [self._candidate(path, known, real) for path, real in listed]

    def candidate(self, path: str) -> Candidate:
        return self._candidate(path, self._manifest_entries())

    def _candidate(self, path: str, known: dict, real_path: str = "") -> Candidate:
        return _with_manifest(path, known.get(os.path.normpath(path)) if known else None, self._name(path),
                              real_path)

    def _name(self, path: str) -> str:
        """``path`` below the directory (what snapshot ids hash); the listing joins it to the root."""
        prefix = self._prefix
        return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, self.path)

    @property
    def _prefix(self) -> str:
        return os.path.join(self.path, "")

    def would_list(self, path: str) -> bool:
        """Whether ``candidates()`` would name ``path`` (by name only: the file may not exist)."""
        rel = os.path.relpath(path, self.path)
        if rel.startswith(".."):
            return False
        parts = rel.split(os.sep)
        if not self.recursive and len(parts) != 1:
            return False
        return is_shard_name(parts[-1]) and not any(is_temporary(p) for p in parts[:-1])

    def _manifest_entries(self) -> dict[str, manifestmod.ManifestEntry]:
        """What the manifest beside the shards says about them: ``manifest.json`` and the
        fragments of packs not yet committed (``manifest.d/``), the manifest's entry first.

        The manifest only saves reading the shards, so a bad one never stops a training job:
        an invalid entry (or one file listed twice) is ignored with a warning, once per
        version of the manifest file, and its shard is indexed from the file; so is a shard
        whose entry has no ``filesize`` (nothing ties such an entry to the file's current
        version). A manifest unreadable as a whole is ignored the same way.
        """
        files = [os.path.join(self.path, manifestmod.DEFAULT_NAME)] + manifestmod.fragment_paths(self.path)
        key = tuple(_version(p) for p in files)
        if self._manifest_cache[0] != key:
            by_path: dict[str, manifestmod.ManifestEntry] = {}
            root = os.path.normpath(self.path)
            root = "" if root == os.curdir else root  # so that joined names are normalized paths too
            for path, version in zip(files, key):
                for e in _usable_entries(path) if version is not None else ():
                    url = e.url
                    where = os.path.join(root, url) if manifestmod.is_plain_name(url) else os.path.normpath(
                        os.path.join(self.path, url))
                    by_path.setdefault(where, e)
            self._manifest_cache = (key, by_path)
        return self._manifest_cache[1]

    @property
    def directory(self) -> str:
        return self.path

    def describe(self) -> str:
        return f"directory {self.path!r}"


class GlobSource(ShardSource):
    def __init__(self, pattern: str):
        self.pattern = pattern

    def candidates(self) -> list[Candidate]:
        names = globmod.glob(self.pattern, recursive=True)
        return [_named(n) for n in sorted(names) if not is_temporary(n) and os.path.isfile(n)]

    def describe(self) -> str:
        return f"glob {self.pattern!r}"


class BraceSource(ShardSource):
    """A brace pattern such as ``shard-{000..099}.tar``; names that do not exist yet are left out."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def candidates(self) -> list[Candidate]:
        names = list(braceexpand.braceexpand(self.pattern))
        return [_named(n) for n in names if os.path.isfile(n)]

    def describe(self) -> str:
        return f"brace pattern {self.pattern!r}"


class ManifestSource(ShardSource):
    """A wids shard index v1 JSON file; relative urls resolve against its directory.

    The manifest was asked for by name, so an invalid entry raises ManifestError (naming the
    file, the entry and the field) rather than being read around. Urls may be absolute paths.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)

    def candidates(self) -> list[Candidate]:
        if not os.path.exists(self.path):
            raise NoShardsError(f"manifest {self.path!r} does not exist (check the path)")
        entries = manifestmod.load(self.path)
        base = os.path.dirname(os.path.abspath(self.path))
        return [
            Candidate(
                url=e.url,
                path=e.url if os.path.isabs(e.url) else os.path.join(base, e.url),
                nsamples=e.nsamples,
                digest=e.digest,
                blocks=e.blocks,
                filesize=e.filesize,
                mtime_ns=e.mtime_ns,
                name=e.url,
            )
            for e in entries
        ]

    def describe(self) -> str:
        return f"manifest {self.path!r}"


def _version(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _usable_entries(path: str) -> list[manifestmod.ManifestEntry]:
    """The entries of a directory's manifest (or fragment) that may stand in for reading the shard."""
    try:
        entries, errors = manifestmod.read(path, contained=True)
    except FileNotFoundError:
        return []  # a fragment merged and removed meanwhile
    except (OSError, manifestmod.ManifestError) as exn:
        log.warning("%s; indexing the shards instead", exn)
        return []
    for exn in errors:
        log.warning("%s; entry ignored, the shard is indexed from its file instead", exn)
    unsized = sum(e.filesize is None for e in entries)
    if unsized:
        log.info("%s: %d entries without filesize; their shards are indexed from the files", path, unsized)
    return [e for e in entries if e.filesize is not None]


def _named(path: str) -> Candidate:
    """A file named on its own (glob, brace pattern, list): its name is its base name."""
    return Candidate(url=path, path=path, name=os.path.basename(path))


def _with_manifest(path: str, entry: manifestmod.ManifestEntry | None, name: str, real_path: str = "") -> Candidate:
    if entry is None:
        return Candidate(url=path, path=path, name=name, real_path=real_path)
    return Candidate(url=path, path=path, nsamples=entry.nsamples, digest=entry.digest, blocks=entry.blocks,
                     filesize=entry.filesize, mtime_ns=entry.mtime_ns, name=name, real_path=real_path)


def local_source(spec: object) -> ShardSource:
    """A ShardSource of local files from a directory, glob, brace pattern, manifest path or file
    path (``storage.backend.make_source`` is the one entry point, for URLs and lists too)."""
    if isinstance(spec, ShardSource):
        return spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(f"cannot make a shard source from {spec!r}")
    if spec.startswith("pipe:"):
        raise NotImplementedError(f"{spec!r}: a pipe: command cannot be listed again at each epoch nor checked for "
                                  "changes; give a directory, a manifest, an s3:// URL or https:// URLs")
    if os.path.isdir(spec):
        return DirectorySource(spec)
    if spec.endswith(".json"):
        return ManifestSource(spec)
    if "{" in spec and "}" in spec:
        return BraceSource(spec)
    if any(ch in spec for ch in "*?["):
        return GlobSource(spec)
    if os.path.isfile(spec):
        return ListSource([BraceSource(spec)])
    if not os.path.lexists(spec):
        raise NoShardsError(f"{spec!r} does not exist (check the path: give a shard directory, a manifest .json, "
                            "a glob, a brace pattern, a shard file, or s3:// or https:// URLs)")
    raise NoShardsError(f"{spec!r} is not a directory, manifest, glob, brace pattern or shard file")
