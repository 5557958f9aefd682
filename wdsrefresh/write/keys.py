"""Which sample keys a shard directory holds, cheaply: for refusing to pack the same keys twice.

Manifests list shards, not keys, so the keys are recorded beside them in ``OUT/.wdsrefresh/keys/``
(gzip'd JSON):

- ``plan-<hash>.json.gz``: ``{"shards": {shard: [keys]}}``, written by ``pack`` before it creates
  the plan with that hash. It counts only while that plan (or its ``done-`` file) exists and
  names the shard: a record left by a pack killed before its plan was created counts for nothing;
- ``shard-<shard>.json.gz``: ``{"shard", "size", "mtime_ns", "keys"}``, the keys of one shard file
  as it is now, written by ``wr.Writer`` when it publishes a shard and by ``directory_keys`` when
  it had to read a shard's tar headers (a shard from ``ingest``, another tool, or an older
  ``pack``). It counts only while the file keeps that size and mtime.

A shard found in neither way is read (tar headers only, with Python's tarfile) and recorded, so
the next look at the directory costs one small file per shard.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence

from ..format.atomic import write_atomic
from ..format.names import is_shard_name, split_key
from .publish import PRIVATE_DIR, done_path, fragment_entries, manifest_entries, plan_path, reserved_names

log = logging.getLogger("wdsrefresh")

KEYS_DIR = os.path.join(PRIVATE_DIR, "keys")


def keys_dir(out: str) -> str:
    return os.path.join(out, KEYS_DIR)


def _write(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, gzip.compress(json.dumps(doc).encode(), compresslevel=1, mtime=0), durable=True)


def _read(path: str) -> dict | None:
    try:
        with gzip.open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, EOFError, ValueError):
        log.warning("%s: damaged key record, ignored (the shards it describes are read instead)", path)
        return None
    return doc if isinstance(doc, dict) else None


def record_plan(out: str, plan_hash: str, keys_by_shard: Mapping[str, Sequence[str]]) -> None:
    """Records the keys a plan puts in each of its shards (before the plan is created)."""
    _write(os.path.join(keys_dir(out), f"plan-{plan_hash}.json.gz"), {"shards": dict(keys_by_shard)})


def record_shard(out: str, shard: str, keys: Sequence[str]) -> None:
    """Records the keys of the shard file ``OUT/shard`` as it is now (its size and mtime)."""
    st = os.stat(os.path.join(out, shard))
    _write(_shard_record_path(out, shard), {"shard": shard, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                            "keys": list(keys)})


def _shard_record_path(out: str, shard: str) -> str:
    return os.path.join(keys_dir(out), "shard-" + shard.replace("/", "%2F") + ".json.gz")


def read_shard_keys(path: str) -> list[str]:
    """The sample keys of a tar shard, in order, from its headers (webdataset's grouping)."""
    keys: list[str] = []
    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, _ = split_key(info.name)
            if key is not None and (not keys or keys[-1] != key):
                keys.append(key)
    return keys


def _plan_records(out: str) -> dict[str, list[list[str]]]:
    """``{shard: [keys, ...]}`` from the plan records whose plan exists (running or done)."""
    found: dict[str, list[list[str]]] = {}
    try:
        names = os.listdir(keys_dir(out))
    except FileNotFoundError:
        return found
    for name in names:
        if not (name.startswith("plan-") and name.endswith(".json.gz")):
            continue
        digest = name[len("plan-") : -len(".json.gz")]
        if not (os.path.exists(plan_path(out, digest)) or os.path.exists(done_path(out, digest))):
            continue  # its pack never created the plan: none of these shards is its
        doc = _read(os.path.join(keys_dir(out), name)) or {}
        for shard, keys in (doc.get("shards") or {}).items():
            found.setdefault(shard, []).append(keys)
    return found


def _shards_in(out: str) -> set[str]:
    """Every shard name a reader of ``out`` may list or a plan has reserved."""
    names = {e.url for e in manifest_entries(out) + fragment_entries(out)}
    names.update(n for n in os.listdir(out) if is_shard_name(n) and os.path.isfile(os.path.join(out, n)))
    names.update(reserved_names(out))
    return names


def shard_keys(out: str, shard: str, planned: Sequence[Sequence[str]] = ()) -> list[str]:
    """The keys of ``OUT/shard`` from its records, or read from the file (and recorded)."""
    path = os.path.join(out, shard)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        doc = _read(_shard_record_path(out, shard))
        if doc and doc.get("size") == st.st_size and doc.get("mtime_ns") == st.st_mtime_ns:
            return doc.get("keys", [])
    if len(planned) == 1 or (st is None and planned):
        return [k for keys in planned for k in keys]  # one plan named it (or several, none wrote it yet)
    if st is None:
        return []
    try:
        keys = read_shard_keys(path)
    except (tarfile.TarError, OSError) as exn:
        log.warning("%s: cannot read its sample keys (%s); duplicate keys in it are not detected", path, exn)
        return []
    try:
        record_shard(out, shard, keys)
    except OSError:
        pass  # a read-only directory: read again next time
    return keys


def directory_keys(out: str) -> dict[str, str]:
    """``{key: shard}`` for every sample key in the shards of ``out`` (listed, present or reserved)."""
    planned = _plan_records(out)
    found: dict[str, str] = {}
    for shard in sorted(_shards_in(out)):
        for key in shard_keys(out, shard, planned.get(shard, ())):
            found.setdefault(key, shard)
    return found


def duplicates(out: str, keys: Iterable[str]) -> list[tuple[str, str]]:
    """``(key, shard)`` for each of ``keys`` some shard of ``out`` already holds, in key order."""
    if not os.path.isdir(out):
        return []
    held = directory_keys(out)
    return sorted((k, held[k]) for k in set(keys) if k in held)
