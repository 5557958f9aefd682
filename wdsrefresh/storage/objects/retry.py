"""A request to a store: retried with backoff, or ended by an error that names the URL.

Every store (``store.Store`` for ``s3://``, ``http_store.HttpStore`` for ``https://``) shares
this policy: a request that failed for a reason worth another try (5xx, throttling, timeouts,
dropped or reset connections, a body cut short) is tried again after an exponential backoff
with full jitter, up to ``attempts`` tries; what it finally means is raised as one of these
errors, naming the URL and, for reads, the byte range. A store says what an exception means
with its ``classify`` (and how to say it in one line with ``summary``); nothing here knows a
protocol.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from ...errors import WdsRefreshError
from ...format.tario import ShardChangedError

log = logging.getLogger("wdsrefresh")

T = TypeVar("T")


class ObjectReadError(WdsRefreshError, OSError):
    """A request to the store that failed for good (after its retries, or not retryable).

    Names the URL and, for reads, the byte range ``[start, stop)``.
    """

    def __init__(self, url: str, message: str, start: int | None = None, stop: int | None = None):
        where = f"{url}: bytes {start}-{stop - 1}" if start is not None and stop is not None else url
        super().__init__(f"{where}: {message}")
        self.url, self.start, self.stop = url, start, stop


class ObjectChangedError(ShardChangedError):
    """The object was replaced since the snapshot: its ETag no longer matches (HTTP 412)."""


class ObjectVanishedError(WdsRefreshError, FileNotFoundError):
    """The object (or the snapshot's version of it) no longer exists (HTTP 404)."""

    def __init__(self, url: str, message: str):
        super().__init__(f"{url}: {message}")
        self.url = url


class Retrying:
    """The retry policy of a store. Subclasses set ``attempts``, ``backoff`` and ``max_backoff``
    and say what an exception means: ``classify`` returns "changed" (412), "gone" (404),
    "not modified" (304), "as is" (an error that already says what happened: raised unchanged),
    "retry", or "fail"."""

    attempts: int
    backoff: float
    max_backoff: float

    def classify(self, exn: BaseException) -> str:
        raise NotImplementedError

    def summary(self, exn: BaseException) -> str:
        """What went wrong, in one line, never naming a credential."""
        return f"{type(exn).__name__}: {exn}"

    def gone(self, url: str, what: str, exn: BaseException) -> str:
        """What a "gone" answer to ``what`` on ``url`` means, in one line (a store says when
        it is not the object that is missing)."""
        return f"{what}: {self.summary(exn)} (deleted)"

    def call(self, url: str, what: str, request: Callable[[], T], start: int | None = None,
             stop: int | None = None) -> T:
        """``request()`` with retries; 412, 404 and final failures as this module's errors."""
        attempt = 1
        while True:
            try:
                return request()
            except Exception as exn:  # noqa: BLE001 - classified, re-raised as a named error or retried
                self._raise_or_wait(url, what, exn, attempt, start, stop)
                attempt += 1

    def _raise_or_wait(self, url: str, what: str, exn: Exception, attempt: int, start: int | None,
                       stop: int | None) -> None:
        """Raises what ``exn`` means (naming the URL and range), or waits before the next attempt."""
        kind = self.classify(exn)
        if kind == "changed":
            raise ObjectChangedError(url, start or 0, f"{what}: replaced since the snapshot "
                                     "(its ETag no longer matches: HTTP 412)") from exn
        if kind == "gone":
            raise ObjectVanishedError(url, self.gone(url, what, exn)) from exn
        if kind in ("not modified", "as is"):
            raise exn
        if kind != "retry" or attempt >= self.attempts:
            tries = f" after {attempt} attempts" if kind == "retry" else ""
            raise ObjectReadError(url, f"{what} failed{tries}: {self.summary(exn)}", start, stop) from exn
        delay = random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
        log.debug("%s: %s failed (%s); retry %d in %.2f s", url, what, self.summary(exn), attempt, delay)
        time.sleep(delay)


class ShortBody(Exception):
    """A response body shorter than the range asked for (retried)."""


class BlockStream(Protocol):
    """One ranged GET's body, opened at a block (``Retrying.stream_blocks``)."""

    named: tuple[str | None, str | None]  # (ETag, VersionId) as the response names them

    def read(self, n: int) -> bytes: ...

    def finish(self) -> None:
        """The last block was read: the connection goes back to the pool."""

    def close(self) -> None: ...


def stream_blocks(retrying: Retrying, url: str, first: int, stop: int, block_size: int, size: int,
                  open_at: Callable[[int], BlockStream], opened: Callable[[], None] | None = None,
                  ) -> Iterator[tuple[bytes, str | None, str | None]]:
    """Blocks ``first <= i < stop`` of an object, in order, each whole, read from the stream
    ``open_at(i)`` opens at block ``i``: a stream cut by a retryable failure is reopened at the
    block it was reading (after ``retrying``'s backoff), so a block is never yielded twice or
    in part. Closing the generator closes the stream. ``opened()`` is called each time a
    stream's response arrived."""
    i, attempt = first, 1
    while i < stop:
        stream = None
        try:
            stream = open_at(i)
            if opened is not None:
                opened()
            while i < stop:
                data = read_exactly(stream, min(block_size, size - i * block_size))
                if i + 1 == stop:
                    stream.finish()
                yield data, *stream.named
                i += 1
                attempt = 1
        except Exception as exn:  # noqa: BLE001 - classified: raised by name, or the stream reopened
            retrying._raise_or_wait(url, "GET", exn, attempt, i * block_size, min((i + 1) * block_size, size))
            attempt += 1
        finally:
            if stream is not None:
                stream.close()


def read_exactly(body: Any, n: int) -> bytes:
    data = body.read(n)
    if len(data) == n:
        return data
    parts, have = [data], len(data)
    while have < n:
        chunk = body.read(n - have)
        if not chunk:
            raise ShortBody(f"the response ended {n - have} bytes early")
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)
