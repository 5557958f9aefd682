"""A web server on 127.0.0.1 for the https:// tests: a directory served with strong ETags.

``web`` (per test) serves a fresh directory over HTTP/1.1 (keep-alive, threaded), as static
file servers and CDNs do: ``ETag`` from the file's inode, size and mtime_ns (so an
``os.replace`` is a new ETag), ``Last-Modified``, ``Accept-Ranges: bytes``, ranges answered
with 206, ``If-Match`` (412) and ``If-None-Match`` (304). Switches turn each of them off (a
server that cannot be read consistently), make it demand a header (everywhere or under a path),
redirect paths, or answer the next requests with a status. Every request is logged (method,
path, range, status) for the tests to count.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int


@dataclass
class WebServer:
    root: str
    url: str = ""
    etags: str = "strong"  # "strong" | "weak" | "none"
    ranges: bool = True  # False: Range ignored (200, whole file), no Accept-Ranges
    if_match: bool = True  # False: If-Match ignored (the file as it is now, with its new ETag)
    required: dict[str, str] = field(default_factory=dict)  # headers a request must carry, else 401
    required_under: dict[str, dict[str, str]] = field(default_factory=dict)  # path prefix -> headers required there
    redirects: dict[str, str] = field(default_factory=dict)  # path -> path it is found at (302), as a hub's CDN
    failures: list[tuple[int, bool]] = field(default_factory=list)  # (status, ranged only): the next requests
    log: list[Logged] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def at(self, name: str) -> str:
        return f"{self.url}/{name}"

    def fail(self, status: int = 503, times: int = 1, ranged: bool = False) -> None:
        """The next ``times`` requests (ranged GETs only, with ``ranged``) are answered ``status``."""
        with self.lock:
            self.failures += [(status, ranged)] * times

    def requests(self, method: str | None = None) -> list[Logged]:
        with self.lock:
            return [r for r in self.log if method is None or r.method == method]

    def clear(self) -> None:
        with self.lock:
            self.log.clear()

    def etag_of(self, name: str) -> str:
        return _etag(os.stat(self.path(name)))


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # the log is WebServer.log
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _answer(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self._logged(status)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _logged(self, status: int) -> None:
        web = self.server.web
        with web.lock:
            web.log.append(Logged(self.command, self.path, self.headers.get("Range"), status))

    def _serve(self, body: bool) -> None:
        web = self.server.web
        ranged = body and "Range" in self.headers
        with web.lock:
            failure = next((f for f in web.failures if ranged or not f[1]), None)
            if failure is not None:
                web.failures.remove(failure)
        if failure is not None:
            return self._answer(failure[0])
        required = dict(web.required)
        for prefix, headers in web.required_under.items():
            if self.path.startswith(prefix):
                required.update(headers)
        if any(self.headers.get(k) != v for k, v in required.items()):
            return self._answer(401, body=b"unauthorized")
        if self.path in web.redirects:
            return self._answer(302, {"Location": web.redirects[self.path]})
        try:
            f = open(os.path.join(web.root, self.path.split("?", 1)[0].lstrip("/")), "rb")
        except (FileNotFoundError, IsADirectoryError):
            return self._answer(404, body=b"not found")
        with f:
            st = os.fstat(f.fileno())  # the ETag of the bytes served, even while the name is replaced
            etag = _etag(st)
            headers = {"Last-Modified": formatdate(st.st_mtime, usegmt=True)}
            if web.etags != "none":
                headers["ETag"] = etag if web.etags == "strong" else f"W/{etag}"
            if web.ranges:
                headers["Accept-Ranges"] = "bytes"
            if_none = self.headers.get("If-None-Match")
            if if_none is not None and if_none.removeprefix("W/") == etag and web.etags != "none":
                return self._answer(304, {k: v for k, v in headers.items() if k == "ETag"})
            if_match = self.headers.get("If-Match")
            if web.if_match and if_match is not None and if_match != etag:
                return self._answer(412, body=b"precondition failed")
            start, stop = 0, st.st_size
            match = _RANGE.match(self.headers.get("Range", "")) if web.ranges and body else None
            status = 200
            if match:
                start = int(match[1])
                stop = min(int(match[2]) + 1 if match[2] else st.st_size, st.st_size)
                if start >= st.st_size:
                    return self._answer(416, {"Content-Range": f"bytes */{st.st_size}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{st.st_size}"
            self._logged(status)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(stop - start))
            self.end_headers()
            if not body:
                return
            f.seek(start)
            left = stop - start
            try:
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    self.wfile.write(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):  # the client closed a stream it no longer needs
                self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    web: WebServer


@pytest.fixture
def web(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.web = WebServer(str(root), url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, name="test-web-server", daemon=True)
    thread.start()
    yield server.web
    server.shutdown()
    server.server_close()
    thread.join(10)
