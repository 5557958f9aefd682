"""Which sample keys a shard directory or prefix holds, cheaply: for refusing to pack the same keys twice.

Manifests list shards, not keys, so the keys are recorded beside them in ``OUT/.wdsrefresh/keys/``
(gzip'd JSON; in a local directory as files, on an object store as objects written with
conditional PUTs, through ``destination.py``):

- ``plan-<hash>.json.gz``: ``{"tasks": [[keys of task 0], ...]}``, written by ``pack`` (only if
  absent: the same hash always records the same keys) before it creates the plan with that hash.
  It counts only while that plan (or its ``done-`` twin) exists, which names each task's shard: a
  record left by a pack killed before its plan was created counts for nothing;
- ``shard-<shard>.json.gz``: ``{"shard", "identity", "keys"}``, the keys of one shard as it is now
  (identity: size and mtime of a file, size and ETag of an object), written by ``wr.Writer`` and
  ``ingest`` when they publish a shard and by ``directory_keys`` when it had to read a shard's tar
  headers (a shard from another tool, or an older ``pack`` or ``ingest``). It counts only while the shard
  keeps that identity.

A shard found in neither way is read (tar headers only, with Python's tarfile; an object is
streamed once) and recorded, so the next look at the output costs one small record per shard.
"""

from __future__ import annotations

import gzip
import json
import logging
import tarfile
from collections.abc import Iterable, Sequence
from typing import IO

from ..format.names import split_key
from .destination import Destination
from .publish import PRIVATE_DIR

log = logging.getLogger("wdsrefresh")

KEYS_DIR = f"{PRIVATE_DIR}/keys"


def _encode(doc: dict) -> bytes:
    return gzip.compress(json.dumps(doc).encode(), compresslevel=1, mtime=0)


def _read(dest: Destination, name: str) -> dict | None:
    data = dest.read_record(f"{KEYS_DIR}/{name}")
    if data is None:
        return None
    try:
        doc = json.loads(gzip.decompress(data))
    except (OSError, EOFError, ValueError):
        log.warning("%s: damaged key record, ignored (the shards it describes are read instead)",
                    dest.location(f"{KEYS_DIR}/{name}"))
        return None
    return doc if isinstance(doc, dict) else None


def record_plan(dest: Destination, plan_hash: str, keys_by_task: Sequence[Sequence[str]]) -> None:
    """Records the keys each task of a plan packs (before the plan is created)."""
    dest.write_record(f"{KEYS_DIR}/plan-{plan_hash}.json.gz", _encode({"tasks": [list(k) for k in keys_by_task]}),
                      create=True)


def record_shard(dest: Destination, shard: str, keys: Sequence[str]) -> None:
    """Records the keys of the shard ``shard`` as it is now (its identity)."""
    identity = dest.shard_identity(shard)
    if identity is not None:
        dest.write_record(f"{KEYS_DIR}/{_shard_record_name(shard)}",
                          _encode({"shard": shard, "identity": list(identity), "keys": list(keys)}))


def _shard_record_name(shard: str) -> str:
    return "shard-" + shard.replace("/", "%2F") + ".json.gz"


def read_shard_keys(f: IO[bytes]) -> list[str]:
    """The sample keys of the tar shard read from ``f``, in order, from its headers (webdataset's grouping)."""
    keys: list[str] = []
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, _ = split_key(info.name)
            if key is not None and (not keys or keys[-1] != key):
                keys.append(key)
    return keys


def _plan_records(dest: Destination, own_plan: str | None) -> tuple[dict[str, list[list[str]]], set[str]]:
    """``({shard: [keys, ...]}, own shards)``: keys from the plan records whose plan exists (running or
    done), and the shards the plan ``own_plan`` names (which a concurrent run of it may have written)."""
    found: dict[str, list[list[str]]] = {}
    own: set[str] = set()
    for name in dest.list_records(KEYS_DIR):
        if not (name.startswith("plan-") and name.endswith(".json.gz")):
            continue
        digest = name[len("plan-") : -len(".json.gz")]
        plan = dest.find_plan(digest)
        if plan is None:
            continue  # its pack never created the plan: none of these shards is its
        shards = [t["shard"] for t in plan.doc["tasks"]]
        if digest == own_plan:
            own.update(shards)
            continue
        tasks = (_read(dest, name) or {}).get("tasks") or []
        for shard, keys in zip(shards, tasks):
            found.setdefault(shard, []).append(keys)
    return found, own


def _shards_in(dest: Destination) -> set[str]:
    """Every shard name a reader of ``dest`` may list or a plan has reserved."""
    names = {e.url for e in dest.manifest_entries() + dest.fragment_entries()}
    return names | dest.shard_names() | dest.reserved_names()


def shard_keys(dest: Destination, shard: str, planned: Sequence[Sequence[str]] = ()) -> list[str]:
    """The keys of the shard ``shard`` from its records, or read from it (and recorded)."""
    identity = dest.shard_identity(shard)
    if identity is not None:
        doc = _read(dest, _shard_record_name(shard))
        if doc and doc.get("identity") == list(identity):
            return doc.get("keys", [])
    if len(planned) == 1 or (identity is None and planned):
        return [k for keys in planned for k in keys]  # one plan named it (or several, none wrote it yet)
    if identity is None:
        return []
    try:
        with dest.open_shard(shard) as f:
            keys = read_shard_keys(f)
    except (tarfile.TarError, OSError) as exn:
        log.warning("%s: cannot read its sample keys (%s); duplicate keys in it are not detected",
                    dest.location(shard), exn)
        return []
    try:
        record_shard(dest, shard, keys)
    except OSError:
        pass  # a read-only output: read again next time
    return keys


def directory_keys(dest: Destination, own_plan: str | None = None) -> dict[str, str]:
    """``{key: shard}`` for every sample key in the shards of ``dest`` (listed, present or reserved),
    but those of the plan ``own_plan``."""
    planned, own = _plan_records(dest, own_plan)
    found: dict[str, str] = {}
    for shard in sorted(_shards_in(dest) - own):
        for key in shard_keys(dest, shard, planned.get(shard, ())):
            found.setdefault(key, shard)
    return found


def duplicates(dest: Destination, keys: Iterable[str], own_plan: str | None = None) -> list[tuple[str, str]]:
    """``(key, shard)`` for each of ``keys`` some shard of ``dest`` already holds (the plan ``own_plan``'s
    shards aside: a concurrent run of the same pack), in key order."""
    held = directory_keys(dest, own_plan)
    return sorted((k, held[k]) for k in set(keys) if k in held)
