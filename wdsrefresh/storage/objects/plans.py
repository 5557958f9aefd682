"""What a source's URLs name, listed afresh at every epoch: the plans ``ObjectSource`` lists.

Each plan yields ``Listed`` items (an object's stat, its name below the source's root, and the
manifest entry describing it, if any): ``s3://`` prefixes (one paginated listing, the prefix's
manifest and uncommitted fragments), globs, named objects (HEADs, or a listing of their
prefix), manifests; ``https://`` URLs named one by one (HEADs: HTTP has no listing) and
manifests. ``ObjectSource`` turns the items into candidates (``source.py``).
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import braceexpand

from ...format import manifest as manifestmod
from ...format.names import is_shard_name, is_temporary
from ..source import NoShardsError
from . import http as http_store
from .http import is_http
from .s3 import ObjectReadError, ObjectStat, ObjectUrl, ObjectVanishedError, Store, same_etag

if TYPE_CHECKING:
    from .source import ObjectSource

log = logging.getLogger("wdsrefresh")


@dataclass(frozen=True)
class Listed:
    stat: ObjectStat
    name: str  # below the source's root
    entry: manifestmod.ManifestEntry | None = None


def describes(entry: manifestmod.ManifestEntry | None, stat: ObjectStat) -> bool:
    """Whether ``entry`` describes this version of the object (so it need not be indexed)."""
    return entry is not None and entry.filesize == stat.size and same_etag(entry.etag, stat.etag)


class Plan:
    kind = "objects"

    def list(self, source: ObjectSource) -> Iterator[Listed]:
        raise NotImplementedError


class Prefix(Plan):
    kind = "s3 prefix"

    def __init__(self, where: ObjectUrl):
        self.bucket, self.prefix = where.bucket, where.key

    def list(self, source: ObjectSource) -> Iterator[Listed]:
        folders: list[str] = []
        stats = list(list_prefix(source.store, self.bucket, self.prefix, "/", folders))
        manifest_url = f"s3://{self.bucket}/{self.prefix}{manifestmod.DEFAULT_NAME}"
        entries: dict[str, manifestmod.ManifestEntry] = {}
        if any(s.url == manifest_url for s in stats):
            try:
                entries = {e.url: e for e in source.manifest(manifest_url, contained=True)}
            except (ObjectVanishedError, ObjectReadError) as exn:
                log.warning("%s; indexing the objects instead", exn)
        shards = {stat.url[len(f"s3://{self.bucket}/{self.prefix}"):]: stat for stat in stats}
        shards = {name: stat for name, stat in shards.items() if is_shard_name(name)}
        pending = f"{self.prefix}{manifestmod.FRAGMENTS_DIR}/" in folders  # fragments of packs not committed
        if pending and any(not describes(entries.get(name), stat) for name, stat in shards.items()):
            for entry in source.fragment_entries(self.bucket, self.prefix):  # shards of packs not committed yet
                stat = shards.get(entry.url)
                if stat is not None and not describes(entries.get(entry.url), stat):
                    entries[entry.url] = entry
        for name, stat in shards.items():
            yield Listed(stat, name, entries.get(name))


class Glob(Plan):
    kind = "s3 glob"

    def __init__(self, where: ObjectUrl):
        self.bucket, self.pattern = where.bucket, where.key
        literal = re.split(r"[*?\[]", self.pattern, maxsplit=1)[0]
        self.prefix = literal
        rest = self.pattern[literal.rfind("/") + 1:]
        self.delimiter = None if "/" in rest or "**" in rest else "/"
        self.regex = re.compile(glob_regex(self.pattern))

    def list(self, source: ObjectSource) -> Iterator[Listed]:
        for stat in list_prefix(source.store, self.bucket, self.prefix, self.delimiter):
            key = stat.url[len(f"s3://{self.bucket}/"):]
            if self.regex.fullmatch(key) and not is_temporary(key) and not key.endswith("/"):
                yield Listed(stat, posixpath.basename(key))


class Objects(Plan):
    """Objects named one by one (a URL, a brace pattern, a list): a few per prefix are asked for
    with one HEAD each, more with one listing of their prefix."""

    kind = "s3 objects"
    HEADS_AT_MOST = 16  # per prefix; beyond, a listing costs fewer requests

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.wheres = [ObjectUrl.parse(u) for u in urls]

    def list(self, source: ObjectSource) -> Iterator[Listed]:
        groups: dict[tuple[str, str], list[str]] = {}
        for url, w in zip(self.urls, self.wheres):
            groups.setdefault((w.bucket, w.key[: w.key.rfind("/") + 1]), []).append(url)
        found: dict[str, ObjectStat] = {}
        few = [url for group in groups.values() if len(group) <= self.HEADS_AT_MOST for url in dict.fromkeys(group)]
        if few:
            with ThreadPoolExecutor(min(source.threads, len(few)), thread_name_prefix="wdsrefresh-head") as pool:
                found.update((s.url, s) for s in pool.map(source.store.head, few) if s is not None)
        for (bucket, prefix), group in groups.items():
            if len(group) > self.HEADS_AT_MOST:
                wanted = set(group)
                found.update((s.url, s) for s in list_prefix(source.store, bucket, prefix, "/") if s.url in wanted)
        for url, w in zip(self.urls, self.wheres):
            if url in found:
                yield Listed(found[url], posixpath.basename(w.key))


class Manifest(Plan):
    kind = "s3 manifest"

    def __init__(self, where: ObjectUrl):
        self.bucket, self.url = where.bucket, str(where)
        self.directory = posixpath.dirname(where.key)

    def _absolute(self, url: str) -> str:
        """An entry's url as an s3:// URL: absolute, or relative to the manifest's prefix."""
        if "://" in url:
            if not url.startswith("s3://"):
                raise manifestmod.ManifestError(f"{self.url}: {url!r}: only s3:// urls can be read with it")
            return url
        key = posixpath.normpath(posixpath.join(self.directory, url))
        if url.startswith("/") or key == ".." or key.startswith("../"):
            raise manifestmod.ManifestError(f"{self.url}: {url!r}: a relative url must stay inside the bucket")
        return f"s3://{self.bucket}/{key}"

    def _named(self, urls: list[str], entries: list[manifestmod.ManifestEntry]) -> Plan:
        return Objects(urls)

    def list(self, source: ObjectSource) -> Iterator[Listed]:
        try:
            entries = source.manifest(self.url, contained=False)
        except ObjectVanishedError as exn:
            raise NoShardsError(f"manifest {self.url!r} does not exist") from exn
        urls = [self._absolute(e.url) for e in entries]
        by_url = {item.stat.url: item for item in self._named(urls, entries).list(source)}
        for url, entry in zip(urls, entries):
            item = by_url.get(url)
            if item is not None:
                yield Listed(item.stat, entry.url, entry)


class Urls(Plan):
    """Shards on a web server named one by one (a URL, a brace pattern, a list): one HEAD each
    (HTTP has no listing), unless ``known`` holds what a manifest recorded of them (size and
    strong ETag: the pin every read of them carries)."""

    kind = "https urls"

    def __init__(self, urls: list[str], known: dict[str, ObjectStat] | None = None):
        self.urls, self.known = urls, known or {}

    def list(self, source: ObjectSource) -> Iterator[Listed]:
        asked = [u for u in dict.fromkeys(self.urls) if u not in self.known]
        found = dict(self.known)
        if asked:
            with ThreadPoolExecutor(min(source.threads, len(asked)), thread_name_prefix="wdsrefresh-head") as pool:
                found.update((s.url, s) for s in pool.map(source.store.head, asked) if s is not None)
        for url in self.urls:
            if url in found:
                yield Listed(found[url], url_name(url))


class HttpManifest(Manifest):
    kind = "https manifest"

    def __init__(self, url: str):
        self.url = url

    def _absolute(self, url: str) -> str:
        """An entry's url as an http(s):// URL: absolute, or relative to the manifest's URL."""
        if "://" in url:
            if not is_http(url):
                raise manifestmod.ManifestError(f"{self.url}: {url!r}: only http(s):// urls can be read with it")
            return url
        if url.startswith("//"):
            raise manifestmod.ManifestError(f"{self.url}: {url!r}: a relative url must stay on the manifest's host")
        return urljoin(self.url, url)

    def _named(self, urls: list[str], entries: list[manifestmod.ManifestEntry]) -> Plan:
        known = {url: ObjectStat(url, e.filesize, e.etag, e.mtime_ns or 0) for url, e in zip(urls, entries)
                 if e.filesize is not None and e.etag and not e.etag.startswith(("W/", "w/"))}
        return Urls(urls, known)


def url_name(url: str) -> str:
    """A shard URL's name: the last segment of its path (no query)."""
    return posixpath.basename(urlsplit(url).path)


def list_prefix(store: Store, bucket: str, prefix: str, delimiter: str | None,
             subprefixes: list[str] | None = None) -> Iterator[ObjectStat]:
    try:
        yield from store.list(bucket, prefix, delimiter, subprefixes)
    except ObjectVanishedError as exn:  # its message names the prefix already
        raise NoShardsError(str(exn)) from exn


def glob_regex(pattern: str) -> str:
    """A glob over object keys as a regex: ``**`` any text, ``*`` and ``?`` within one level."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def http_plan(spec: str) -> Plan:
    path = urlsplit(spec).path
    if "{" in spec and "}" in spec:
        return Urls(list(braceexpand.braceexpand(spec)))
    if path.endswith(".json"):
        return HttpManifest(spec)
    if is_shard_name(posixpath.basename(path)) and not any(ch in path for ch in "*["):
        return Urls([spec])
    raise ValueError(f"{spec!r}: HTTP has no listing, so a directory or a glob cannot be read over "
                     f"{urlsplit(spec).scheme}://; give a manifest URL (.../manifest.json) or a brace pattern "
                     "of shard URLs (.../shard-{000..099}.tar)")


def why_not(scheme: str) -> str:
    if scheme == "file":
        return "give the local path itself"
    return ("wdsrefresh reads shards through s3:// and https:// (or http://) only, where every ranged read is "
            "pinned to a VersionId or an ETag (a read that is not could mix two versions of a replaced object); "
            "S3-compatible stores (MinIO, R2, Ceph, GCS's XML API) are read as s3:// URLs with "
            "storage_options={'endpoint_url': ...}")


def plan_for(spec: str) -> Plan:
    """The plan that lists what ``spec`` names; a clear error for what cannot be read consistently."""
    if not isinstance(spec, str):
        raise TypeError(f"cannot make a shard source from {spec!r}")
    scheme = spec.partition("://")[0].lower()
    if scheme in http_store.SCHEMES:
        return http_plan(spec)
    if scheme != "s3":
        raise NotImplementedError(f"{spec!r}: {scheme}:// cannot be read consistently here: {why_not(scheme)}")
    where = ObjectUrl.parse(spec)
    key = where.key
    if "{" in key and "}" in key:
        return Objects(list(braceexpand.braceexpand(spec)))
    if any(ch in key for ch in "*?["):
        return Glob(where)
    if key.endswith(".json"):
        return Manifest(where)
    if key == "" or key.endswith("/"):
        return Prefix(where)
    if is_shard_name(key):
        return Objects([spec])
    return Prefix(ObjectUrl(where.bucket, key + "/"))
