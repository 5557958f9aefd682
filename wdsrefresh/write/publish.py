"""Publishing shards into a directory: numbering, renaming into place, updating the manifest.

Every step that changes ``OUT`` holds an exclusive lock on it (``out_lock``), so packs and
ingests into the same directory never take the same shard number. A published name is never
replaced: ``rename_without_replacing`` refuses an existing one.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..format import manifest as manifestmod
from ..format.atomic import fsync_dir
from ..format.manifest import ManifestEntry
from ..format.names import is_shard_name
from ..format.tario import index_shard

if TYPE_CHECKING:
    from .pack import WrittenShard

MANIFEST_NAME = manifestmod.DEFAULT_NAME
LOCK_NAME = ".wdsrefresh.lock"


@contextmanager
def out_lock(out: str) -> Iterator[None]:
    """Exclusive lock on the output directory, for numbering shards and updating the manifest."""
    fd = os.open(os.path.join(out, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def current_entries(out: str) -> list[ManifestEntry]:
    """The manifest's entries; without a manifest, the shards already in ``out``, indexed."""
    path = os.path.join(out, MANIFEST_NAME)
    if os.path.exists(path):
        return manifestmod.load(path)
    names = sorted(n for n in os.listdir(out) if is_shard_name(n) and os.path.isfile(os.path.join(out, n)))
    entries = []
    for name in names:
        index = index_shard(os.path.join(out, name), url=name)
        entries.append(ManifestEntry(name, index.nsamples, os.path.getsize(os.path.join(out, name)),
                                     index.digest, index.blocks))
    return entries


def next_number(out: str, prefix: str, entries: Iterable[ManifestEntry] = ()) -> int:
    """One more than the highest ``PREFIX-N.tar`` in ``out`` or in the manifest entries."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)\.tar(?:\.gz)?$")
    names = list(os.listdir(out)) + [os.path.basename(e.url) for e in entries]
    numbers = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return max(numbers, default=-1) + 1


def rename_without_replacing(tmp_path: str, final_path: str) -> None:
    """Renames without ever replacing an existing file."""
    if os.path.lexists(final_path):
        raise FileExistsError(f"{final_path}: already exists; refusing to replace a published shard")
    os.rename(tmp_path, final_path)


def add_to_manifest(out: str, entries: list[ManifestEntry], new: Sequence[ManifestEntry]) -> None:
    """Rewrites the manifest atomically as ``entries`` plus the ``new`` ones not yet listed."""
    listed = {e.url for e in entries}
    manifestmod.save(os.path.join(out, MANIFEST_NAME), entries + [e for e in new if e.url not in listed])


def publish(out: str, written: Sequence[WrittenShard], prefix: str) -> list[ManifestEntry]:
    """Renames durable temporary shards to their numbered names and updates the manifest."""
    with out_lock(out):
        entries = current_entries(out)
        first = next_number(out, prefix, entries)
        new = []
        for i, shard in enumerate(written):
            name = shard_name(prefix, first + i)
            rename_without_replacing(shard.tmp_path, os.path.join(out, name))
            new.append(shard.entry(name))
        fsync_dir(out)
        add_to_manifest(out, entries, new)
    return new
