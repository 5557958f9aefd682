"""The manifest file: a wids shard index v1, plus a digest (and block digests) per shard.

    {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": ...,
     "shardlist": [{"url": "shard-000000.tar", "nsamples": 1000, "filesize": 123,
                    "digest": "xxh3_128:...", "blocks": "hex of 8-byte block digests"}]}

Readers of plain wids manifests ignore the extra keys; manifests without them are accepted.
Writing replaces the file atomically (temporary name, fsync, rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

from .atomic import write_atomic

KIND = "wids-shard-index-v1"
DEFAULT_NAME = "manifest.json"  # what pack and ingest write next to the shards


class ManifestError(ValueError):
    """A manifest that cannot be read; names the file and what is wrong."""


@dataclass(frozen=True)
class ManifestEntry:
    url: str
    nsamples: int | None = None
    filesize: int | None = None
    digest: str | None = None
    blocks: bytes | None = None

    def to_json(self) -> dict:
        out: dict = {"url": self.url}
        for key in ("nsamples", "filesize", "digest"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.blocks is not None:
            out["blocks"] = self.blocks.hex()
        return out


def load(path: str) -> list[ManifestEntry]:
    """Entries of the manifest at ``path``, in order."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as exn:
        raise ManifestError(f"{path}: not valid JSON ({exn})") from None
    shardlist = doc.get("shardlist") if isinstance(doc, dict) else None
    if not isinstance(shardlist, list):
        raise ManifestError(f"{path}: no 'shardlist' list (expected a {KIND} manifest)")
    entries = []
    for i, item in enumerate(shardlist):
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise ManifestError(f"{path}: shardlist[{i}] has no 'url' string")
        blocks = item.get("blocks")
        entries.append(
            ManifestEntry(
                url=item["url"],
                nsamples=item.get("nsamples"),
                filesize=item.get("filesize"),
                digest=item.get("digest"),
                blocks=bytes.fromhex(blocks) if isinstance(blocks, str) else None,
            )
        )
    return entries


def save(path: str, entries: Iterable[ManifestEntry], name: str | None = None) -> None:
    """Writes the manifest atomically: readers see the old or the new file, never a part."""
    doc = {
        "__kind__": KIND,
        "wids_version": 1,
        "name": name or os.path.basename(os.path.dirname(os.path.abspath(path))),
        "shardlist": [e.to_json() for e in entries],
    }
    write_json_atomic(path, doc, indent=1)


def write_json_atomic(path: str, doc: object, indent: int | None = None) -> None:
    """Writes ``doc`` as JSON to ``path`` durably: readers see the old or the new file, never a part."""
    write_atomic(path, json.dumps(doc, indent=indent).encode(), durable=True)
