"""Shards served over ``https://`` (or ``http://``): HEAD, pinned ranged GETs, conditional GETs.

The same interface as ``store.Store`` (``head``, ``read_blocks``, ``get_if_changed``, and the
options a ``reader.BlockFetcher`` reads), so shards on a web server are read, checked and
reloaded exactly as objects in S3 are. Guarantees:

- Only a server that can pin a version is read: every shard's HEAD and every ranged GET must
  carry a strong ETag, and a ranged GET must be answered with ``206 Partial Content``.
  Otherwise ``UnpinnableError`` names the URL and the pin that is missing: a server without
  them cannot be read consistently (a shard replaced mid-epoch would be read half old, half new).
- Every ranged GET sends ``If-Match: <ETag>`` and its response's ETag is compared with the pin,
  so a server that ignores ``If-Match`` is caught as well: 412 or another ETag raises
  ``ObjectChangedError`` (the ``on_change`` policy), 404 or 410 ``ObjectVanishedError``.
- Retries, backoff and the errors naming the URL and byte range are ``retry.Retrying``'s, as
  for S3; a stream cut mid-way is reopened at the block it was reading.
- The connection pool (urllib3) is made on first use in each process, never pickled; headers
  given in ``storage_options={"headers": {...}}`` (tokens) are sent with every request and never
  appear in ``repr``, snapshots, state dicts, logs or error messages (urllib3 drops
  ``Authorization`` when a redirect leaves the host).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import Any

from ...errors import WdsRefreshError
from .retry import ObjectChangedError, ObjectReadError, ObjectVanishedError, Retrying, ShortBody, stream_blocks
from .s3 import DEFAULT_ATTEMPTS, DEFAULT_BACKOFF, DEFAULT_MAX_BACKOFF, ObjectStat, same_etag
from .window import read_options

SCHEMES = ("http", "https")
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
MAX_REDIRECTS = 5
_OPTIONS = ("headers", "attempts", "backoff", "max_backoff", "readahead", "request_blocks", "cache_dir",
            "cache_limit", "connect_timeout", "read_timeout", "memory_budget", "max_requests")
_RETRIED_STATUS = {408, 425, 429, 500, 502, 503, 504}


class UnpinnableError(WdsRefreshError, NotImplementedError):
    """A server that cannot be read consistently: it sends no strong ETag, or ignores ranges."""

    def __init__(self, url: str, missing: str):
        super().__init__(f"{url}: cannot be read consistently: {missing}; wdsrefresh reads a shard over HTTP only "
                         "when every response names its version (a strong ETag, checked with If-Match) and ranges "
                         "are served (206): otherwise a shard replaced while it is read would mix two versions")
        self.url = url


class _Status(Exception):
    """A response whose status is not the one asked for (classified by ``HttpStore.classify``)."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status} {reason}".rstrip())
        self.status = status


def is_http(url: object) -> bool:
    return isinstance(url, str) and url.partition("://")[0].lower() in SCHEMES and "://" in url


_pools: dict[tuple[float, float], Any] = {}  # this process's urllib3 pools, by timeouts
_pools_lock = threading.Lock()


def _forget_pools_in_child() -> None:  # a forked child (a DataLoader worker) makes its own connections
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()  # the parent's may have been held by a thread the fork did not copy


os.register_at_fork(after_in_child=_forget_pools_in_child)


class HttpStore(Retrying):
    """A web server and how to reach it; ``storage_options``: ``headers`` (sent with every
    request: an ``Authorization`` token, say), ``connect_timeout`` (10 s), ``read_timeout`` (60 s),
    and as for ``s3://``: ``attempts``, ``backoff``, ``max_backoff``, ``readahead``,
    ``request_blocks``, ``memory_budget``, ``max_requests``, ``cache_dir`` with ``cache_limit``."""

    def __init__(self, storage_options: dict[str, Any] | None = None, also_known: tuple[str, ...] = ()):
        """``also_known``: as ``s3.Store``'s."""
        options = dict(storage_options or {})
        unknown = sorted(k for k in options if k not in _OPTIONS)
        if unknown:
            raise TypeError(f"storage_options for https:// URLs: unknown option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted({*_OPTIONS, *also_known}))}")
        headers = options.get("headers") or {}
        if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in headers.items()):
            raise TypeError("storage_options: headers must be a dict of str names to str values")
        self.headers = dict(headers)
        self.attempts = int(options.get("attempts", DEFAULT_ATTEMPTS))
        self.backoff = float(options.get("backoff", DEFAULT_BACKOFF))
        self.max_backoff = float(options.get("max_backoff", DEFAULT_MAX_BACKOFF))
        self.readahead, self.request_blocks, self.memory_budget, self.max_requests = read_options(options)
        self.timeouts = (float(options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
                         float(options.get("read_timeout", DEFAULT_READ_TIMEOUT)))
        if self.attempts < 1 or min(self.timeouts) <= 0:
            raise ValueError("storage_options: attempts must be >= 1, timeouts > 0")
        self.cache = None
        if options.get("cache_dir") is not None or options.get("cache_limit") is not None:
            if options.get("cache_dir") is None or options.get("cache_limit") is None:
                raise ValueError("storage_options: cache_dir and cache_limit go together")
            from .cache import BlockCache

            self.cache = BlockCache(options["cache_dir"], options["cache_limit"])

    def __repr__(self) -> str:  # header names only, never their values
        return f"HttpStore(headers: {', '.join(sorted(self.headers)) or 'none'})"

    # ------------------------------------------------------------------ the connection pool
    def pool(self) -> Any:
        """This process's urllib3 PoolManager (one for every store with these timeouts: headers
        go with each request), made on first use; a forked child makes its own, none is pickled."""
        with _pools_lock:
            pool = _pools.get(self.timeouts)
            if pool is None:
                pool = _pools[self.timeouts] = self._make_pool()
        return pool

    def _make_pool(self) -> Any:
        try:
            import urllib3
        except ImportError:
            raise ImportError("https:// sources need urllib3: pip install 'wdsrefresh[http]'") from None
        # retried here (naming URL and range), not by urllib3; redirects followed (a hub's CDN)
        retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=MAX_REDIRECTS)
        return urllib3.PoolManager(maxsize=32, retries=retries,
                                   timeout=urllib3.Timeout(connect=self.timeouts[0], read=self.timeouts[1]))

    def _send(self, method: str, url: str, headers: dict[str, str], stream: bool = False) -> Any:
        return self.pool().request(method, url, headers={**self.headers, **headers}, preload_content=not stream)

    # ------------------------------------------------------------------ what failures mean
    def classify(self, exn: BaseException) -> str:
        if isinstance(exn, (ObjectChangedError, ObjectVanishedError, ObjectReadError, UnpinnableError)):
            return "as is"
        if isinstance(exn, _Status):
            if exn.status == 412:
                return "changed"
            if exn.status in (404, 410):
                return "gone"
            return "retry" if exn.status in _RETRIED_STATUS or exn.status >= 500 else "fail"
        if isinstance(exn, (ShortBody, ConnectionError, TimeoutError)):
            return "retry"
        try:
            import urllib3.exceptions as ux
        except ImportError:  # pragma: no cover - fails earlier, at the pool
            return "fail"
        return "retry" if isinstance(exn, ux.HTTPError) else "fail"

    def summary(self, exn: BaseException) -> str:
        return str(exn) if isinstance(exn, _Status) else super().summary(exn)

    # ------------------------------------------------------------------ requests
    def head(self, url: str, if_match: str | None = None) -> ObjectStat | None:
        """The current version of the shard at ``url`` (None if there is none); 412 when
        ``if_match`` fails. Raises UnpinnableError when the server cannot pin what it serves."""
        headers = {"Accept-Encoding": "identity"}
        if if_match:
            headers["If-Match"] = if_match
        try:
            r = self.call(url, "HEAD", lambda: _expect(url, self._send("HEAD", url, headers), 200))
        except ObjectVanishedError:
            return None
        etag = _strong_etag(url, r.headers.get("ETag"))
        if r.headers.get("Accept-Ranges", "bytes").strip().lower() != "bytes":
            raise UnpinnableError(url, "the server does not serve byte ranges (Accept-Ranges: "
                                       f"{r.headers.get('Accept-Ranges')})")
        length = r.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ObjectReadError(url, "HEAD: the server does not say the shard's size (no Content-Length)")
        return ObjectStat(url, int(length), etag, _mtime_ns(r.headers.get("Last-Modified")))

    def read_blocks(self, url: str, first: int, stop: int, block_size: int, size: int, *,
                    etag: str | None = None, version_id: str | None = None, opened: Callable[[], None] | None = None,
                    ) -> Iterator[tuple[bytes, str | None, str | None]]:
        """Blocks ``first <= i < stop`` of the version whose ETag is ``etag``, in order, each whole:
        ``(data, etag, None)``. One ranged GET (``If-Match``) streams them all; a stream cut by a
        retryable failure is reopened at the block it was reading, so no block is yielded twice or
        in part. Closing the generator closes the stream; ``opened`` is called when a response's
        headers arrived."""
        pin = _strong_etag(url, etag)

        def open_at(i: int) -> _Body:
            start, end = i * block_size, min(stop * block_size, size)
            headers = {"Range": f"bytes={start}-{end - 1}", "If-Match": pin, "Accept-Encoding": "identity"}
            response = _expect(url, self._send("GET", url, headers, stream=True), 206)
            try:
                _check_pinned(url, response, pin, start, end)
            except BaseException:
                _Body(response, pin).close()
                raise
            return _Body(response, pin)

        return stream_blocks(self, url, first, stop, block_size, size, open_at, opened)

    def get_if_changed(self, url: str, etag: str | None) -> tuple[bytes, str | None] | None:
        """The whole (small) document at ``url`` and its ETag, unless its ETag is still ``etag``
        (``If-None-Match``, weak ETags allowed: a manifest is read whole): then None."""
        headers = {"If-None-Match": etag} if etag else {}

        def once() -> tuple[bytes, str | None] | None:
            r = self._send("GET", url, headers)
            if r.status == 304:
                return None
            _expect(url, r, 200)
            return r.data, r.headers.get("ETag")

        return self.call(url, "GET", once)


class _Body:
    """A urllib3 response as a ``retry.BlockStream``."""

    def __init__(self, response: Any, pin: str):
        self.response, self.named, self.done = response, (pin, None), False
        self.read = response.read

    def finish(self) -> None:
        self.done = True
        self.response.release_conn()  # the whole body read: the connection is reused

    def close(self) -> None:
        if not self.done:
            self.response.close()  # a body not read to its end never goes back to the pool
            self.response.release_conn()


def _expect(url: str, response: Any, status: int) -> Any:
    """``response`` if its status is ``status``; else raises _Status for the retry policy to
    classify (a 206 asked for and a 200 answered: the server ignores ranges, UnpinnableError)."""
    if response.status == status:
        return response
    response.close()  # never read on: a 200 in place of a 206 may be the whole shard
    response.release_conn()
    if status == 206 and response.status == 200:
        raise UnpinnableError(url, "the server ignores byte ranges (200 instead of 206 Partial Content)")
    raise _Status(response.status, response.reason or "")


def _strong_etag(url: str, etag: str | None) -> str:
    if not etag:
        raise UnpinnableError(url, "the server sends no strong ETag (none at all)")
    if etag.startswith(("W/", "w/")):
        raise UnpinnableError(url, f"the server sends no strong ETag (only a weak one, {etag})")
    return etag


def _check_pinned(url: str, response: Any, pin: str, start: int, end: int) -> None:
    """A ranged response is the pinned version's bytes ``[start, end)``, or raises: another ETag
    (a server that ignored If-Match) is a replacement."""
    etag = _strong_etag(url, response.headers.get("ETag"))
    if not same_etag(etag, pin):
        raise ObjectChangedError(url, start, f"GET: replaced since the snapshot (ETag {etag}, the snapshot's "
                                 f"is {pin}; the server did not apply If-Match)")
    content_range = response.headers.get("Content-Range", "")
    if not content_range.startswith(f"bytes {start}-{end - 1}/"):
        raise ObjectReadError(url, f"GET: the server answered another range ({content_range or 'none'})", start, end)


def _mtime_ns(value: str | None) -> int:
    try:
        return int(parsedate_to_datetime(value).timestamp() * 1e9) if value else 0
    except (TypeError, ValueError):
        return 0
