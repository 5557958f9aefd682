"""Shard digests: a whole-file digest written ``algo:hex`` plus per-block digests.

The whole-file digest is plain xxh3_128 over the file's bytes (``xxh128sum`` computes the
same). Block digests (xxh3_64 over fixed-size blocks, 8 bytes each, concatenated) let a
reader that streams only part of a shard check every byte it yields, at the moment the block
is read and before any sample is cut from it.

xxh3 was chosen by measurement: about 11 GB/s here against 1.75 GB/s for sha256, which keeps
the inline check within a few percent of an unchecked read. sha256 and md5 digests from
external manifests are accepted and checked over the whole file.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import xxhash

BLOCK_SIZE = 4 << 20
DEFAULT_ALGO = "xxh3_128"
_BLOCK_DIGEST_SIZE = 8


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


def new_hasher(algo: str) -> Hasher:
    """A streaming hasher for ``algo`` (xxh3_128, xxh3_64, sha256, sha1, md5)."""
    if algo == "xxh3_128":
        return xxhash.xxh3_128()
    if algo == "xxh3_64":
        return xxhash.xxh3_64()
    if algo in ("sha256", "sha1", "md5", "sha512", "blake2b"):
        return hashlib.new(algo)
    raise ValueError(f"unsupported digest algorithm {algo!r}")


def split_digest(digest: str) -> tuple[str, str]:
    """``"xxh3_128:ab12.."`` -> ``("xxh3_128", "ab12..")``; raises ValueError if malformed."""
    algo, sep, hexpart = digest.partition(":")
    if not sep or not hexpart:
        raise ValueError(f"digest {digest!r} is not written algo:hex")
    new_hasher(algo)
    return algo, hexpart.lower()


def block_digest(data: bytes) -> bytes:
    return xxhash.xxh3_64_digest(data)


def block_at(blocks: bytes, index: int) -> bytes:
    start = index * _BLOCK_DIGEST_SIZE
    return blocks[start : start + _BLOCK_DIGEST_SIZE]


class FileDigester:
    """Feeds on a file's bytes in order, block by block; yields the whole and block digests."""

    def __init__(self, algo: str = DEFAULT_ALGO):
        self.algo = algo
        self._whole = new_hasher(algo)
        self._blocks: list[bytes] = []

    def update_block(self, data: bytes) -> None:
        self._whole.update(data)
        self._blocks.append(block_digest(data))

    @property
    def digest(self) -> str:
        return f"{self.algo}:{self._whole.hexdigest()}"

    @property
    def blocks(self) -> bytes:
        return b"".join(self._blocks)
