"""The manifest file: a wids shard index v1, plus identity and digests per shard.

    {"__kind__": "wids-shard-index-v1", "wids_version": 1, "wdsrefresh_version": 1, "name": ...,
     "shardlist": [{"url": "shard-000000.tar", "nsamples": 1000, "filesize": 123,
                    "mtime_ns": 1700000000123456789,
                    "digest": "xxh3_128:...", "blocks": "hex of 8-byte block digests"}]}

Readers of plain wids manifests ignore the extra keys; manifests without them (plain wids
manifests, and ones written before ``wdsrefresh_version`` existed) are accepted. A manifest
written by a newer wdsrefresh (a higher ``wdsrefresh_version``) is refused: its fields may
mean something this version does not know.

An entry describes one version of one file: ``filesize`` and ``mtime_ns`` are what the file
had when it was indexed (never its inode, so copies made with ``cp -p`` or ``rsync -t``
stay valid); for an object in a store, ``filesize`` and its ``etag``. Such copies keep the modification time only to the precision of the target
file system and of the tool (1 s or 2 s on some file systems, whole seconds with older
rsync); a copy whose ``mtime_ns`` differs is not wrong, its entries simply no longer apply
and readers index the file again (``wdsrefresh index`` rewrites them).

Every entry is checked when the manifest is read (``read``/``load``): types and ranges,
digest syntax, block digests consistent with the size, a sample count that fits in the
size, no file listed twice, and for a directory's own manifest urls that stay inside the
directory. Errors name the manifest, the entry (index and url) and the field.
Writing replaces the file atomically (temporary name, fsync, rename).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import WdsRefreshError
from .atomic import write_atomic
from .digest import BLOCK_SIZE, new_hasher
from .names import join_url, split_url

KIND = "wids-shard-index-v1"
DEFAULT_NAME = "manifest.json"
FRAGMENTS_DIR = "manifest.d"  # one fragment per packing task, merged into manifest.json by its commit
_FRAGMENT_RE = re.compile(r"part-([0-9a-f]+)-(\d+)\.json$")  # what pack and ingest write next to the shards
VERSION_KEY = "wdsrefresh_version"
VERSION = 1  # the manifest format this module writes, and the newest it reads

_TAR_BLOCK = 512  # a sample takes at least one tar header
_MAX_DEFLATE_RATIO = 1032  # deflate never expands its input more than this on decompression
_BLOCK_DIGEST_HEX = 16  # one xxh3_64 block digest, in hex
_HEX = re.compile(r"[0-9a-fA-F]*")
_DIGEST_HEX: dict[str, int] = {}  # hex digits of a digest, by algorithm


class ManifestError(WdsRefreshError, ValueError):
    """A manifest that cannot be read; names the file and what is wrong."""


@dataclass(frozen=True)
class ManifestEntry:
    url: str
    nsamples: int | None = None
    filesize: int | None = None
    digest: str | None = None
    blocks: bytes | None = None
    mtime_ns: int | None = None
    etag: str | None = None  # an object's ETag (opaque, as the store returned it): the version described

    def to_json(self) -> dict:
        out: dict = {"url": self.url}
        for key in ("nsamples", "filesize", "mtime_ns", "etag", "digest"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.blocks is not None:
            out["blocks"] = self.blocks.hex()
        return out


class _BadField(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")


def read(path: str, *, contained: bool = False) -> tuple[list[ManifestEntry], list[ManifestError]]:
    """The valid entries of the manifest at ``path`` in order, and one error per invalid entry.

    Invalid entries are left out. When one file is listed twice, every entry for it is left
    out (an error names each repeat and the first listing). With ``contained`` (a directory's
    own manifest), urls must be relative paths that stay inside the manifest's directory.
    Raises ManifestError when the file as a whole cannot be read (not JSON, no shard list,
    written by a newer wdsrefresh); OSError when it cannot be opened.
    """
    return parse(_document(path), path, os.path.dirname(os.path.abspath(path)), contained=contained)


def parse(doc: object, path: str, base: str, *, contained: bool = False,
          ) -> tuple[list[ManifestEntry], list[ManifestError]]:
    """``read`` for a manifest already decoded from JSON (``doc``, e.g. fetched from an object
    store); ``path`` names it in errors, relative urls are against ``base`` (a directory or a URL
    prefix)."""
    doc = _checked_document(doc, path)
    checked: list[tuple[int, ManifestEntry]] = []
    errors: list[tuple[int, ManifestError]] = []
    for i, item in enumerate(doc["shardlist"]):
        try:
            checked.append((i, _entry(item, contained)))
        except _BadField as exn:
            errors.append((i, ManifestError(f"{path}: {_where(i, item)}: {exn}")))
    first: dict[str, int] = {}
    repeated: set[str] = set()
    file_key = _file_key if split_url(base) else _local_key(base)
    keys = [file_key(entry.url, base) for _, entry in checked]
    for (i, entry), key in zip(checked, keys):
        if key in first:
            repeated.add(key)
            errors.append((i, ManifestError(
                f"{path}: {_where(i, entry.to_json())}: url: names the same file as shardlist[{first[key]}] "
                "(an entry listed twice would yield its samples twice)")))
        else:
            first[key] = i
    entries = [entry for (_, entry), key in zip(checked, keys) if key not in repeated]
    return entries, [exn for _, exn in sorted(errors, key=lambda pair: pair[0])]


def fragment_paths(directory: str) -> list[str]:
    """The manifest fragments of a shard directory (``manifest.d/part-*.json``), in name order."""
    fragments = os.path.join(directory, FRAGMENTS_DIR)
    try:
        names = os.listdir(fragments)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [os.path.join(fragments, n) for n in sorted(names) if _FRAGMENT_RE.match(n)]


def load(path: str, *, contained: bool = False) -> list[ManifestEntry]:
    """Entries of the manifest at ``path``, in order; every one checked as ``read`` does.

    Raises ManifestError for the first invalid entry: this is for a manifest the caller asked
    for by name, where a wrong entry must not be read around silently.
    """
    entries, errors = read(path, contained=contained)
    if errors:
        raise errors[0]
    return entries


def save(path: str, entries: Iterable[ManifestEntry], name: str | None = None) -> None:
    """Writes the manifest atomically: readers see the old or the new file, never a part."""
    write_json_atomic(path, document(entries, name or os.path.basename(os.path.dirname(os.path.abspath(path)))),
                      indent=1)


def document(entries: Iterable[ManifestEntry], name: str) -> dict:
    """The manifest document listing ``entries`` (what ``save`` writes; an object store's is PUT)."""
    return {
        "__kind__": KIND,
        "wids_version": 1,
        VERSION_KEY: VERSION,
        "name": name,
        "shardlist": [e.to_json() for e in entries],
    }


def write_json_atomic(path: str, doc: object, indent: int | None = None) -> None:
    """Writes ``doc`` as JSON to ``path`` durably: readers see the old or the new file, never a part."""
    write_atomic(path, json.dumps(doc, indent=indent).encode(), durable=True)


# ---- checking what a manifest says -------------------------------------------------------


def decode(data: bytes, path: str) -> object:
    """The JSON document in ``data``; ManifestError naming ``path`` when it is not JSON."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ManifestError(f"{path}: not valid JSON ({exn})") from None


def _document(path: str) -> object:
    with open(path, "rb") as f:
        return decode(f.read(), path)


def _checked_document(doc: object, path: str) -> dict:
    shardlist = doc.get("shardlist") if isinstance(doc, dict) else None
    if not isinstance(shardlist, list):
        raise ManifestError(f"{path}: no 'shardlist' list (expected a {KIND} manifest)")
    version = doc.get(VERSION_KEY)
    if version is not None:
        if not _is_int(version) or version < 1:
            raise ManifestError(f"{path}: {VERSION_KEY}: expected a positive integer, got {version!r}")
        if version > VERSION:
            raise ManifestError(
                f"{path}: written in manifest format version {version} by a newer wdsrefresh; "
                f"this wdsrefresh reads versions up to {VERSION} (upgrade wdsrefresh, or rebuild "
                "the manifest with 'wdsrefresh index')")
    return doc


def _where(i: int, item: object) -> str:
    url = item.get("url") if isinstance(item, dict) else None
    return f"shardlist[{i}] ({url!r})" if isinstance(url, str) and url else f"shardlist[{i}]"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(item: object, contained: bool) -> ManifestEntry:
    """The entry ``item`` describes; raises _BadField naming the first field that is wrong."""
    if not isinstance(item, dict):
        raise _BadField("entry", f"expected an object, got {item!r}")
    url = _url(item.get("url"), contained)
    nsamples = _count(item, "nsamples")
    filesize = _count(item, "filesize")
    mtime_ns = item.get("mtime_ns")
    if mtime_ns is not None and not _is_int(mtime_ns):
        raise _BadField("mtime_ns", f"expected an integer (nanoseconds), got {mtime_ns!r}")
    digest = _digest(item.get("digest"))
    blocks = _blocks(item.get("blocks"), filesize)
    etag = item.get("etag")
    if etag is not None and (not isinstance(etag, str) or not etag.strip('"')):
        raise _BadField("etag", f"expected a non-empty string, got {etag!r}")
    if nsamples is not None and filesize is not None and nsamples > _max_samples(url, filesize):
        raise _BadField("nsamples", f"{nsamples} samples cannot fit in {filesize} bytes "
                        f"(a sample takes at least one {_TAR_BLOCK}-byte tar header)")
    return ManifestEntry(url, nsamples, filesize, digest, blocks, mtime_ns, etag)


def _url(url: object, contained: bool) -> str:
    if not isinstance(url, str) or not url:
        raise _BadField("url", f"expected a non-empty string, got {url!r}")
    if "\0" in url:
        raise _BadField("url", "contains a NUL character")
    if contained and not is_plain_name(url):
        norm = os.path.normpath(url)
        if os.path.isabs(url) or split_url(url) or norm in (".", "..") or norm.startswith("../"):
            raise _BadField("url", "expected a relative path inside the manifest's directory "
                            "(a directory's own manifest lists only its shards)")
    return url


def _count(item: dict, key: str) -> int | None:
    value = item.get(key)
    if value is not None and (not _is_int(value) or value < 0):
        raise _BadField(key, f"expected a non-negative integer, got {value!r}")
    return value


def _digest(digest: object) -> str | None:
    if digest is None:
        return None
    if not isinstance(digest, str):
        raise _BadField("digest", f"expected a string 'algo:hex', got {digest!r}")
    algo, sep, hexpart = digest.partition(":")
    if not sep:
        raise _BadField("digest", f"expected 'algo:hex', got {digest!r}")
    size = _DIGEST_HEX.get(algo)
    if size is None:
        try:
            size = _DIGEST_HEX[algo] = len(new_hasher(algo).hexdigest())
        except ValueError as exn:
            raise _BadField("digest", str(exn)) from None
    if len(hexpart) != size or not _HEX.fullmatch(hexpart):
        raise _BadField("digest", f"expected {size} hex digits after '{algo}:', got {hexpart!r}")
    return digest


def _blocks(blocks: object, filesize: int | None) -> bytes | None:
    if blocks is None:
        return None
    try:
        data = bytes.fromhex(blocks) if isinstance(blocks, str) else None
    except ValueError:
        data = None
    # fromhex skips whitespace: the length check also refuses it
    if data is None or 2 * len(data) != len(blocks) or len(blocks) % _BLOCK_DIGEST_HEX:
        shown = blocks if not isinstance(blocks, str) or len(blocks) <= 40 else blocks[:40] + "..."
        raise _BadField("blocks", f"expected hex digits, {_BLOCK_DIGEST_HEX} per block, got {shown!r}")
    if filesize is not None:
        want = -(-filesize // BLOCK_SIZE)
        have = len(blocks) // _BLOCK_DIGEST_HEX
        if have != want:
            raise _BadField("blocks", f"{have} block digests for {filesize} bytes, expected {want} "
                            f"(one per {BLOCK_SIZE}-byte block)")
    return data


def _max_samples(url: str, filesize: int) -> int:
    """The most samples a shard of ``filesize`` bytes can hold.

    Uncompressed, each sample takes at least one 512-byte header. A gzip shard (named
    ``.gz`` or ``.tgz``) can hold more than its size suggests, though never more than deflate's
    largest expansion allows.
    """
    if url.endswith((".gz", ".tgz")):
        return filesize * _MAX_DEFLATE_RATIO // _TAR_BLOCK
    return filesize // _TAR_BLOCK


def is_plain_name(url: str) -> bool:
    """A file name of the manifest's own directory: no separator, not "." or "..", no scheme
    (a scheme needs "://"). Its path is the directory joined with it, no normalizing needed."""
    return "/" not in url and url != "." and url != ".." and (os.altsep is None or os.altsep not in url)


def _local_key(base: str):
    """``_file_key`` for a manifest in a local directory ``base`` (absolute, normalized)."""
    def key(url: str, _base: str) -> str:
        return os.path.join(base, url) if is_plain_name(url) else _file_key(url, base)
    return key


def _file_key(url: str, base: str) -> str:
    """What tells two entries apart: the file a url names (relative urls against ``base``)."""
    if split_url(url):
        return url
    in_store = split_url(base)
    if in_store:  # a manifest in an object store: keys are "/"-separated, whatever the OS
        scheme, root = in_store
        return join_url(scheme, posixpath.normpath(posixpath.join(root, url)))
    return os.path.normpath(os.path.join(base, url))
