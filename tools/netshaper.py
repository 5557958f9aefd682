#!/usr/bin/env python
"""A loopback network shaper: an HTTP/1.1 proxy on 127.0.0.1 that makes a local server behave
like a store across a network.

Each request's response starts no earlier than ``delay`` seconds (plus or minus ``jitter``,
uniform) after the request arrived: the first-byte latency every request to a real store
pays. Response bytes leave at most at ``conn_rate`` bytes/s per client connection and
``link_rate`` bytes/s for all connections together (a reservation clock per connection and one
for the link, so slow sleeps are made up within a few milliseconds of burst). A rate of None
is unlimited; ``set(delay=0, conn_rate=None, link_rate=None)`` turns shaping off (the proxy's
own ceiling).

It counts what a test or a benchmark asks about: requests in flight (from the request line to
the last response byte) per client, and their peak; response bytes sent per path; and a log
of every request (method, path, range, client, when it arrived, when its first and last byte
left). ``fault`` (a callable of (method, path, headers, index), index counting requests from 0)
may answer "cut-body" (half the body, then a clean close), "reset-body" (half the body, then a
reset) or "reset" (no response at all) for a request: a connection cut mid-way.

One implementation serves the tests (``Shaper(...)`` in-process) and ``tools/bench.py
--remote`` (``python tools/netshaper.py UPSTREAM``, a process of its own so that it never
shares a reader's GIL): the control path ``/__shaper__/`` (never an S3 path: bucket names have
no underscore) answers ``GET stats`` with the counters as JSON, ``GET set?delay=...`` changes
the settings and ``GET reset`` clears the counters.

    python tools/netshaper.py http://127.0.0.1:5000 --delay 0.025 --conn-rate 16e6 --link-rate 160e6
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

DEFAULT_DELAY = 0.025  # seconds to the first response byte (S3 within a region: tens of ms)
DEFAULT_JITTER = 0.005
DEFAULT_CONN_RATE = 16e6  # bytes/s per connection
DEFAULT_LINK_RATE = 160e6  # bytes/s for the whole link
CONTROL = "/__shaper__/"
_CHUNK = 64 << 10  # bytes paced at a time
_CONN_BURST = 0.005  # seconds of a connection's rate a late sender may make up
_LINK_BURST = 0.002
_UPSTREAM_TIMEOUT = 60.0
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "content-length"}


@dataclass
class Settings:
    delay: float = DEFAULT_DELAY
    jitter: float = DEFAULT_JITTER
    conn_rate: float | None = DEFAULT_CONN_RATE
    link_rate: float | None = DEFAULT_LINK_RATE


@dataclass
class Request:
    """One request as the shaper saw it (times are ``time.monotonic()`` in the shaper's process)."""

    method: str
    path: str
    range: str | None
    client: str
    arrived: float
    first_byte: float = 0.0
    done: float = 0.0
    sent: int = 0  # response body bytes written to the client
    fault: str | None = None


class _Clock:
    """A pacing clock: ``reserve(n)`` returns when ``n`` bytes may leave at ``rate``."""

    def __init__(self, burst: float):
        self.free = 0.0
        self.burst = burst

    def reserve(self, n: int, rate: float | None, now: float) -> float:
        if not rate:
            return now
        start = max(self.free, now - self.burst)
        self.free = start + n / rate
        return start


class Shaper:
    """The shaping proxy in front of ``upstream`` (``http://host:port``), on 127.0.0.1 (``port``
    0: any free port); ``url`` once started."""

    def __init__(self, upstream: str, settings: Settings | None = None, *, port: int = 0,
                 fault: Callable[[str, str, object, int], str | None] | None = None,
                 client_of: Callable[[str, object], str] | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.settings = settings or Settings()
        self.fault = fault
        self.client_of = client_of or (lambda address, headers: address)
        self.lock = threading.Lock()
        self.link = _Clock(_LINK_BURST)
        self.log: list[Request] = []
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.sent: dict[str, int] = {}  # response body bytes per path (query left out)
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    def start(self) -> Shaper:
        self.thread = threading.Thread(target=self.server.serve_forever, name="netshaper", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # delays and pacing sleeps end at once
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> Shaper:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ settings and counters
    def set(self, **settings) -> None:
        with self.lock:
            for name, value in settings.items():
                if not hasattr(self.settings, name):
                    raise TypeError(f"netshaper: no setting {name!r}")
                setattr(self.settings, name, value)

    def reset(self) -> None:
        with self.lock:
            self.log.clear()
            self.peak = dict(self.in_flight)
            self.sent.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (path is None or path in r.path)]

    def sent_to(self, path: str) -> int:
        """Response body bytes sent for paths that contain ``path``."""
        with self.lock:
            return sum(n for p, n in self.sent.items() if path in p)

    def busy(self) -> int:
        """Requests in flight, all clients."""
        with self.lock:
            return sum(self.in_flight.values())

    def stats(self) -> dict:
        with self.lock:
            return {"settings": asdict(self.settings), "in_flight": dict(self.in_flight), "peak": dict(self.peak),
                    "sent": dict(self.sent), "requests": [asdict(r) for r in self.log]}

    # ------------------------------------------------------------------ one request's life
    def _arrive(self, request: Request) -> int:
        with self.lock:
            index = len(self.log)
            self.log.append(request)
            n = self.in_flight.get(request.client, 0) + 1
            self.in_flight[request.client] = n
            self.peak[request.client] = max(self.peak.get(request.client, 0), n)
            return index

    def _leave(self, request: Request) -> None:
        with self.lock:
            request.done = time.monotonic()
            self.in_flight[request.client] -= 1

    def _first_byte_at(self, request: Request) -> float:
        with self.lock:
            delay, jitter = self.settings.delay, self.settings.jitter
        return request.arrived + max(0.0, delay + (random.uniform(-jitter, jitter) if delay else 0.0))

    def _pace(self, conn: _Clock, n: int) -> None:
        """Waits until ``n`` more bytes may leave on this connection and on the link."""
        now = time.monotonic()
        with self.lock:
            at = max(conn.reserve(n, self.settings.conn_rate, now), self.link.reserve(n, self.settings.link_rate, now))
        if at > now:
            self.stopping.wait(at - now)

    def _count(self, request: Request, path: str, n: int) -> None:
        with self.lock:
            request.sent += n
            self.sent[path] = self.sent.get(path, 0) + n


def _handler(shaper: Shaper):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            self.clock = _Clock(_CONN_BURST)
            self.upstream: http.client.HTTPConnection | None = None

        def finish(self) -> None:
            if self.upstream is not None:
                self.upstream.close()
            super().finish()

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except (ConnectionError, OSError):
                self.close_connection = True

        def _reset(self) -> None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _control(self) -> None:
            what = urlsplit(self.path)
            if what.path == CONTROL + "set":
                shaper.set(**{k: None if v == "none" else float(v) for k, v in parse_qsl(what.query)})
                payload = {"settings": asdict(shaper.settings)}
            elif what.path == CONTROL + "reset":
                shaper.reset()
                payload = {}
            else:
                payload = shaper.stats()
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _upstream_response(self, body: bytes | None) -> http.client.HTTPResponse:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            for attempt in (0, 1):  # a kept-alive upstream connection the server closed: once more, anew
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(*shaper.upstream, timeout=_UPSTREAM_TIMEOUT)
                try:
                    self.upstream.request(self.command, self.path, body=body, headers=headers)
                    return self.upstream.getresponse()
                except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                    self.upstream.close()
                    self.upstream = None
                    if attempt:
                        raise
            raise AssertionError("unreachable")

        def _forward(self) -> None:
            if self.path.startswith(CONTROL):
                return self._control()
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            client = shaper.client_of(self.client_address[0], self.headers)
            request = Request(self.command, self.path, self.headers.get("Range"), client, time.monotonic())
            index = shaper._arrive(request)
            try:
                self._respond(request, index, body)
            finally:
                shaper._leave(request)

        def _respond(self, request: Request, index: int, body: bytes | None) -> None:
            fault = shaper.fault(self.command, self.path, self.headers, index) if shaper.fault else None
            request.fault = fault
            if fault == "reset":
                self._reset()
                return
            response = self._upstream_response(body)
            out = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            declared = response.getheader("Content-Length")
            no_body = self.command == "HEAD" or response.status in (204, 304)
            data = None
            if declared is None and not no_body:  # chunked upstream: sent with a length
                data = response.read()
                declared = str(len(data))
            wait = shaper._first_byte_at(request) - time.monotonic()
            if wait > 0:
                shaper.stopping.wait(wait)
            request.first_byte = time.monotonic()
            self.send_response(response.status)
            for k, v in out:
                self.send_header(k, v)
            if declared is not None:
                self.send_header("Content-Length", declared)
            self.end_headers()
            if no_body:
                response.read()
                return
            total = int(declared)
            cut = total // 2 if fault in ("cut-body", "reset-body") else None
            path = urlsplit(self.path).path
            sent = 0
            while sent < total:
                n = min(_CHUNK, total - sent) if cut is None else min(_CHUNK, cut - sent)
                if n <= 0:
                    break
                chunk = data[sent : sent + n] if data is not None else response.read(n)
                if not chunk:
                    break
                shaper._pace(self.clock, len(chunk))
                self.wfile.write(chunk)
                sent += len(chunk)
                shaper._count(request, path, len(chunk))
            if cut is not None:
                self.wfile.flush()
                self.upstream.close()  # the rest of the upstream body is not read
                self.upstream = None
                if fault == "reset-body":
                    self._reset()
                else:
                    self.connection.shutdown(socket.SHUT_WR)
                    self.close_connection = True

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


def control(url: str, what: str = "stats", **query) -> dict:
    """Asks the shaper at ``url`` (another process's) for ``stats``, to ``reset``, or to ``set``
    ``query`` (None for unlimited)."""
    from urllib.parse import urlencode
    from urllib.request import urlopen

    q = urlencode({k: "none" if v is None else v for k, v in query.items()})
    with urlopen(f"{url}{CONTROL}{what}{'?' + q if q else ''}", timeout=60) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("upstream", help="the server to shape, http://127.0.0.1:PORT")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--delay", type=float, default=DEFAULT_DELAY, help="seconds to a response's first byte")
    parser.add_argument("--jitter", type=float, default=DEFAULT_JITTER, help="+/- seconds around --delay")
    parser.add_argument("--conn-rate", type=float, default=DEFAULT_CONN_RATE, help="bytes/s per connection (0: none)")
    parser.add_argument("--link-rate", type=float, default=DEFAULT_LINK_RATE, help="bytes/s in all (0: none)")
    args = parser.parse_args(argv)
    settings = Settings(args.delay, args.jitter, args.conn_rate or None, args.link_rate or None)
    shaper = Shaper(args.upstream, settings, port=args.port).start()
    print(shaper.url, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    finally:
        shaper.stop()


if __name__ == "__main__":
    main()
