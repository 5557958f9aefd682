"""One S3 store: URLs, a client made lazily in each process, listing, pinned reads, retries.

Guarantees:

- Every read of a shard's bytes is pinned: ``VersionId`` where the store returned one (or
  ``null`` in a versioned bucket, for objects written before versioning was enabled, together
  with ``If-Match``), else ``If-Match: <ETag>``. An unpinned read is refused (a plain GET after
  a replacement would silently mix versions). 412 raises ``ObjectChangedError`` (a ``ShardChangedError``: the
  object was replaced), 404 ``ObjectVanishedError`` (a ``FileNotFoundError``: deleted).
- 5xx, throttling, timeouts and dropped or reset connections are retried with exponential
  backoff (full jitter); a request that still fails raises ``ObjectReadError`` naming the URL
  and, for reads, the byte range. A retried read returns the whole range or nothing: callers
  never see a partial body.
- The boto3 client is made on first use in each process (DataLoader workers, forked or
  spawned, make their own) and is never pickled. Credentials come from the standard AWS chain
  (environment, ``AWS_ENDPOINT_URL``, profiles) or ``storage_options``; they never appear in
  ``repr``, snapshots, state dicts, logs or error messages.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import s3_listing as listing
from .retry import ObjectChangedError, ObjectReadError, ObjectVanishedError, Retrying, ShortBody, stream_blocks  # noqa: F401 - re-exported
from .window import read_options

log = logging.getLogger("wdsrefresh")

DEFAULT_ATTEMPTS = 6  # tries per request, the first included
DEFAULT_BACKOFF = 0.2  # seconds before the first retry; doubles at each retry, with full jitter
DEFAULT_MAX_BACKOFF = 10.0
DEFAULT_PAGE_SIZE = 1000  # keys per ListObjectsV2 page (S3's maximum)
LIST_THREADS = 8  # key ranges of a prefix listed at once (each usually one page)

# storage_options understood here; anything else is refused, naming the key (never a value)
_CLIENT_OPTIONS = {
    "endpoint_url": "endpoint_url", "region_name": "region_name", "region": "region_name",
    "aws_access_key_id": "aws_access_key_id", "key": "aws_access_key_id",
    "aws_secret_access_key": "aws_secret_access_key", "secret": "aws_secret_access_key",
    "aws_session_token": "aws_session_token", "token": "aws_session_token",
}
_OWN_OPTIONS = ("attempts", "backoff", "max_backoff", "page_size", "readahead", "request_blocks", "cache_dir",
                "cache_limit", "profile", "client_kwargs", "config_kwargs", "memory_budget", "max_requests")
_RETRIED_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
                  "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException",
                  "BandwidthLimitExceeded", "EC2ThrottledException"}
_GONE_CODES = {"NoSuchKey", "NoSuchVersion", "NotFound", "NoSuchBucket"}


@dataclass(frozen=True)
class ObjectUrl:
    """``s3://bucket/key``."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> ObjectUrl:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() != "s3":
            raise ValueError(f"{url!r}: not an s3:// URL")
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{url!r}: no bucket name")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ObjectStat:
    """One version of one object, as a listing or a HEAD saw it. ``etag`` is opaque (quotes kept)."""

    url: str
    size: int
    etag: str
    mtime_ns: int  # Last-Modified
    version_id: str | None = None


def same_etag(a: str | None, b: str | None) -> bool:
    """Whether two ETags name the same object version (quotes and case of the hex ignored)."""
    return a is not None and b is not None and a.strip('"').lower() == b.strip('"').lower()


def _timestamp(value: str) -> datetime:
    """An S3 timestamp: ISO 8601 in listings (fast path), an HTTP date in headers (botocore's)."""
    try:
        when = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
        if when.tzinfo is not None:
            return when
    except (TypeError, ValueError):
        pass
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)


def _ns(when: datetime) -> int:
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


_process_lock = threading.Lock()


def _fresh_lock_in_child() -> None:
    global _process_lock
    _process_lock = threading.Lock()  # the parent's may have been held by a thread the fork did not copy


os.register_at_fork(after_in_child=_fresh_lock_in_child)


class Store(Retrying):
    """An S3 (or S3-compatible) store and how to reach it; ``storage_options`` as in pandas or
    HF datasets: ``endpoint_url``, ``region_name``, ``profile``, ``key``/``secret``/``token``,
    ``client_kwargs`` and ``config_kwargs`` (botocore ``Config``), plus ``attempts``,
    ``backoff``, ``max_backoff`` (retries), ``page_size`` (listing), ``readahead`` (blocks read
    ahead of each reader at most), ``request_blocks`` (blocks one GET streams at most),
    ``memory_budget`` and ``max_requests`` (each consumer's bytes read ahead and GETs in flight,
    ``window.py``), and ``cache_dir`` with ``cache_limit`` (a node-local cache of checked blocks,
    ``cache.py``).
    Unset options come from the AWS chain and the environment (``AWS_ENDPOINT_URL`` included).
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, also_known: tuple[str, ...] = ()):
        """``also_known``: keys its caller took out of ``storage_options`` first, listed as known
        when a key is refused."""
        options = dict(storage_options or {})
        unknown = sorted(k for k in options if k not in _CLIENT_OPTIONS and k not in _OWN_OPTIONS)
        if unknown:
            raise TypeError(f"storage_options: unknown option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted({*_CLIENT_OPTIONS, *_OWN_OPTIONS, *also_known}))}")
        self.attempts = int(options.pop("attempts", DEFAULT_ATTEMPTS))
        self.backoff = float(options.pop("backoff", DEFAULT_BACKOFF))
        self.max_backoff = float(options.pop("max_backoff", DEFAULT_MAX_BACKOFF))
        self.page_size = int(options.pop("page_size", DEFAULT_PAGE_SIZE))
        self.readahead, self.request_blocks, self.memory_budget, self.max_requests = read_options(options, pop=True)
        cache_dir, cache_limit = options.pop("cache_dir", None), options.pop("cache_limit", None)
        if (cache_dir is None) != (cache_limit is None):
            raise ValueError("storage_options: cache_dir and cache_limit go together")
        self.cache = None
        if cache_dir is not None:
            from .cache import BlockCache

            self.cache = BlockCache(cache_dir, cache_limit)
        if min(self.attempts, self.page_size) < 1:
            raise ValueError("storage_options: attempts and page_size must be >= 1")
        self._options = options
        self._client: Any = None
        self._pid: int | None = None
        self._page_ends: dict[tuple, list[str]] = {}  # (bucket, prefix, delimiter) -> where its last listing's pages ended

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = state["_pid"] = None  # never pickled: each process makes its own
        state["_page_ends"] = {}
        return state

    def __repr__(self) -> str:
        return f"Store(options: {', '.join(sorted(self._options)) or 'none'})"  # names only, never values

    # ------------------------------------------------------------------ the client
    def client(self) -> Any:
        """This process's boto3 client, made on first use (after a fork, the child makes its own)."""
        pid = os.getpid()
        if self._pid != pid:
            with _process_lock:
                if self._pid != pid:
                    self._client = self._make_client()
                    self._pid = pid
        return self._client

    def _make_client(self) -> Any:
        try:
            import boto3
            import botocore.session
            from botocore.config import Config
        except ImportError:
            raise ImportError("s3:// sources need boto3: pip install 'wdsrefresh[s3]'") from None
        options = dict(self._options)
        core = botocore.session.get_session()
        # botocore parses each listed key's LastModified with dateutil, 3/4 of a listing's cost here
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
        session = boto3.session.Session(botocore_session=core, profile_name=options.pop("profile", None))
        config = {"retries": {"max_attempts": 0, "mode": "standard"},  # retried here, naming URL and range
                  "max_pool_connections": 32, "connect_timeout": 10, "read_timeout": 60,
                  # every block read is checked against its xxh3 digest: botocore's CRC32 of each body
                  # would be a second pass over the bytes, holding the GIL the tar reader needs
                  "response_checksum_validation": "when_required"}
        config.update(options.pop("config_kwargs", None) or {})
        kwargs = dict(options.pop("client_kwargs", None) or {})
        kwargs.update((_CLIENT_OPTIONS[k], v) for k, v in options.items())
        client = session.client("s3", config=Config(**config), **kwargs)
        # first: before botocore's own check of 200 responses for embedded errors, which parses the
        # whole page once more (listing.parse_page makes that check)
        client.meta.events.register_first("before-parse.s3.ListObjectsV2", listing.keep_page)
        return client

    # ------------------------------------------------------------------ requests
    def classify(self, exn: BaseException) -> str:  # the retry policy itself is retry.Retrying's
        return _classify(exn)

    def summary(self, exn: BaseException) -> str:
        return _summary(exn)

    def gone(self, url: str, what: str, exn: BaseException) -> str:
        if _error_code(exn) == "NoSuchBucket":
            return (f"the bucket {ObjectUrl.parse(url).bucket!r} does not exist (check its name, and the endpoint: "
                    "endpoint_url or AWS_ENDPOINT_URL)")
        return super().gone(url, what, exn)

    def read_blocks(self, url: str, first: int, stop: int, block_size: int, size: int, *,
                    etag: str | None = None, version_id: str | None = None, opened: Callable[[], None] | None = None,
                    ) -> Iterator[tuple[bytes, str | None, str | None]]:
        """Blocks ``first <= i < stop`` of the object version pinned by ``version_id`` (else
        ``etag``), in order, each whole: ``(data, etag, version_id)`` as the response names them.

        One ranged GET streams them all; a stream cut by a retryable failure is reopened at the
        block it was reading (after a backoff), so a block is never yielded twice or in part.
        Closing the generator closes the stream; ``opened`` is called when a response's headers
        arrived (the first-byte latency the reader's window sizes its GETs from).
        """
        if not etag and not version_id:
            raise ValueError(f"{url}: refusing to read an object with neither VersionId nor ETag to pin it")
        where = ObjectUrl.parse(url)
        kwargs: dict[str, Any] = {"Bucket": where.bucket, "Key": where.key}
        kwargs.update(_pin(version_id, etag))

        def open_at(i: int) -> _Body:
            kwargs["Range"] = f"bytes={i * block_size}-{min(stop * block_size, size) - 1}"
            response = self.client().get_object(**kwargs)
            named = (response.get("ETag"), _version(response.get("VersionId")))
            if named[1] and "VersionId" not in kwargs:  # a versioned bucket: the exact version from now on
                kwargs.pop("IfMatch")
                kwargs.update(_pin(named[1], etag))
            return _Body(response["Body"], named)

        return stream_blocks(self, url, first, stop, block_size, size, open_at, opened)

    def head(self, url: str, if_match: str | None = None) -> ObjectStat | None:
        """The current version of the object (None if there is none); 412 when ``if_match`` fails."""
        where = ObjectUrl.parse(url)
        kwargs: dict[str, Any] = {"Bucket": where.bucket, "Key": where.key}
        if if_match:
            kwargs["IfMatch"] = if_match
        try:
            r = self.call(url, "HEAD", lambda: self.client().head_object(**kwargs))
        except ObjectVanishedError:
            return None
        return ObjectStat(url, r["ContentLength"], r["ETag"], _ns(r["LastModified"]), _version(r.get("VersionId")))

    def get_if_changed(self, url: str, etag: str | None) -> tuple[bytes, str] | None:
        """The whole (small) object unless its ETag is still ``etag`` (``If-None-Match``): then None."""
        where = ObjectUrl.parse(url)
        kwargs: dict[str, Any] = {"Bucket": where.bucket, "Key": where.key}
        if etag:
            kwargs["IfNoneMatch"] = etag

        def once() -> tuple[bytes, str]:
            response = self.client().get_object(**kwargs)
            with response["Body"] as body:
                return body.read(), response["ETag"]

        try:
            return self.call(url, "GET", once)
        except Exception as exn:  # noqa: BLE001
            if _classify(exn) == "not modified":
                return None
            raise

    def list(self, bucket: str, prefix: str, delimiter: str | None = "/",
             subprefixes: list[str] | None = None) -> Iterator[ObjectStat]:
        """The objects whose keys start with ``prefix`` (with ``delimiter``: not below a further
        ``/``), in key order, over as many ListObjectsV2 pages as it takes. The "folders" the
        delimiter rolled up (``prefix/sub/``) are appended to ``subprefixes`` when given.

        Pages follow each other by continuation tokens, so a long listing is a chain of round
        trips. Once a prefix was listed, the keys where its pages ended split the next listing
        into key ranges (``StartAfter``) listed ``LIST_THREADS`` at once: as many requests as
        one chain when nothing changed, a page more per range that grew."""
        url = f"s3://{bucket}/{prefix}"
        base: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": self.page_size}
        if delimiter:
            base["Delimiter"] = delimiter
        ends = self._page_ends.get((bucket, prefix, delimiter), [])
        ranges = list(zip([None, *ends], [*ends, None]))
        if len(ranges) == 1:
            parts = [self._list_range(url, base, None, None)]
        else:
            with ThreadPoolExecutor(min(LIST_THREADS, len(ranges)), thread_name_prefix="wdsrefresh-list") as pool:
                parts = list(pool.map(lambda r: self._list_range(url, base, *r), ranges))
        keys = [o[0] for objects, _ in parts for o in objects]
        self._page_ends[(bucket, prefix, delimiter)] = keys[self.page_size - 1 : -1 : self.page_size]
        for objects, folders in parts:
            if subprefixes is not None:
                subprefixes += folders
            for key, size, etag, modified in objects:
                yield ObjectStat(f"s3://{bucket}/{key}", size, etag, _ns(_timestamp(modified)))

    def _list_range(self, url: str, base: dict[str, Any], after: str | None, upto: str | None,
                    ) -> tuple[list[tuple[str, int, str, str]], list[str]]:
        """The objects and rolled-up folders listed after ``after`` up to ``upto`` (None: no bound)."""
        kwargs = dict(base, StartAfter=after) if after is not None else dict(base)
        objects: list[tuple[str, int, str, str]] = []
        folders: list[str] = []
        found: list[str] = []  # one page's folders (a retried page starts again from none)
        while True:
            page, token = self.call(url, "LIST", lambda: _page(self.client().list_objects_v2(**kwargs), found))
            objects += [o for o in page if (upto is None or o[0] <= upto) and (after is None or o[0] > after)]
            folders += [f for f in found if (upto is None or f <= upto) and (after is None or f > after)]
            last = max(page[-1][0] if page else "", found[-1] if found else "")
            if token is None or (upto is not None and last >= upto):
                return objects, folders
            kwargs["ContinuationToken"] = token

    def versioning(self, bucket: str) -> bool | None:
        """Whether versioning is enabled on ``bucket``; None when the store will not say."""
        try:
            r = self.call(f"s3://{bucket}/", "GetBucketVersioning",
                          lambda: self.client().get_bucket_versioning(Bucket=bucket))
        except ObjectReadError:
            return None
        return r.get("Status") == "Enabled"


def _page(response: dict, prefixes: list[str]) -> tuple[list[tuple[str, int, str, str]], str | None]:
    """A ListObjectsV2 page's objects and continuation token, from the body ``listing.keep_page``
    kept (else as botocore parsed it: a client made without that handler); its rolled-up folders
    replace the contents of ``prefixes``."""
    prefixes.clear()
    raw = response.get(listing.RAW_PAGE)
    if raw is not None:
        return listing.parse_page(raw, prefixes)
    prefixes += [p["Prefix"] for p in response.get("CommonPrefixes", ())]
    objects = [(o["Key"], o["Size"], o["ETag"], o["LastModified"].isoformat()) for o in response.get("Contents", ())]
    return objects, response.get("NextContinuationToken") if response.get("IsTruncated") else None


class _Body:
    """A GetObject body as a ``retry.BlockStream``."""

    def __init__(self, body: Any, named: tuple[str | None, str | None]):
        self.read, self.close, self.named = body.read, body.close, named

    def finish(self) -> None:
        self.read()  # the end of the body: the connection goes back to the pool, not closed


NULL_VERSION = "null"  # the VersionId of an object written while its bucket had no versioning


def _version(version_id: str | None) -> str | None:
    """The VersionId a response names (``"null"`` included: GET accepts ``versionId=null``)."""
    return version_id or None


def _pin(version_id: str | None, etag: str | None) -> dict[str, str]:
    """The GetObject arguments that pin a read: the VersionId, else the ETag. The ``null``
    version is pinned by both: a PUT while versioning is suspended replaces it in place."""
    if not version_id:
        return {"IfMatch": etag}
    if version_id == NULL_VERSION and etag:
        return {"VersionId": version_id, "IfMatch": etag}
    return {"VersionId": version_id}


def _classify(exn: BaseException) -> str:
    """ "changed" (412), "gone" (404), "not modified" (304), "retry", or "fail"."""
    if isinstance(exn, (ShortBody, listing.PageError)):
        return "retry"
    try:
        import botocore.exceptions as bx
        import urllib3.exceptions as ux
    except ImportError:  # pragma: no cover - boto3 missing fails earlier, at the client
        return "fail"
    if isinstance(exn, bx.ClientError):
        error = exn.response.get("Error", {})
        status = exn.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = str(error.get("Code", ""))
        if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return "changed"  # 409 ConditionalRequestConflict: a conditional write raced another one
        if status == 304 or code == "304":
            return "not modified"
        if status == 404 or code in _GONE_CODES:
            return "gone"
        if status >= 500 or status == 429 or code in _RETRIED_CODES:
            return "retry"
        return "fail"
    retried = (bx.HTTPClientError, bx.IncompleteReadError, bx.ResponseStreamingError, ux.HTTPError,
               ConnectionError, TimeoutError)
    return "retry" if isinstance(exn, retried) else "fail"


def _error_code(exn: BaseException) -> str:
    """The S3 error code of a botocore ClientError ("NoSuchBucket"), else ""."""
    response = getattr(exn, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _summary(exn: BaseException) -> str:
    """What went wrong, in one line: the error's class and message (botocore's name the operation
    and the status; neither carries credentials)."""
    try:
        import botocore.exceptions as bx

        if isinstance(exn, bx.ClientError):
            error = exn.response.get("Error", {})
            status = exn.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            return f"HTTP {status} {error.get('Code', '')}: {error.get('Message', '')}".rstrip(": ")
    except ImportError:  # pragma: no cover
        pass
    return f"{type(exn).__name__}: {exn}"
