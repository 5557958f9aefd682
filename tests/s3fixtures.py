"""An S3 server on 127.0.0.1 for the object-store tests, and a loopback proxy that injects faults.

``moto_server`` (session) runs moto's S3 server in-process on 127.0.0.1, port 0. ``s3`` (per
test) sets dummy credentials and ``AWS_ENDPOINT_URL`` in the environment (so DataLoader
workers and spawned ranks inherit them; no request can reach a real AWS endpoint), and makes
a fresh bucket. ``fault_proxy`` sits between the code under test and the server: it forwards
every request and can answer some with a status (503), delay them, or reset the connection
before or in the middle of the response body. ``link`` puts tools/netshaper.py's shaper (the
one ``tools/bench.py --remote`` measures through) in front of the server instead: first-byte
delays, per-connection bandwidth, requests in flight and bytes sent counted at the proxy.
Import the fixtures into a test module.
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
import sys
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shardutil import make_samples, tar_bytes

REGION = "us-east-1"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "content-length"}


@pytest.fixture(scope="session")
def moto_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    yield f"http://{host}:{port}"
    server.stop()


def aws_environment(monkeypatch, endpoint: str) -> None:
    """Dummy credentials and a loopback endpoint; no profile or config file of this machine."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@dataclass
class Bucket:
    """A fresh bucket on the loopback server, written directly (never through the fault proxy)."""

    name: str
    endpoint: str
    client: object

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> dict:
        """Uploads ``data`` in one PUT; returns the response (ETag, VersionId)."""
        return self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def put_shard(self, key: str, n: int, size: int = 64, prefix: str | None = None, version: str = "") -> dict:
        """A shard of ``n`` samples keyed ``<prefix>/<i>``, payloads marked with ``version``."""
        prefix = prefix or key.rsplit("/", 1)[-1].split(".")[0]
        return self.put(key, shard_bytes(prefix, n, size, version))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)

    def enable_versioning(self) -> None:
        self.client.put_bucket_versioning(Bucket=self.name, VersioningConfiguration={"Status": "Enabled"})


def shard_bytes(prefix: str, n: int, size: int = 64, version: str = "") -> bytes:
    """A tar of ``n`` samples; ``version`` (if any) is written into every payload, so a sample's
    bytes say which version of its shard they came from."""
    samples = make_samples(prefix, n, size)
    if version:
        for s in samples:
            tag = f"[{version}]".encode()
            s["bin"] = (tag + s["bin"])[:size]
            s["ver"] = version.encode()
    return tar_bytes(samples)


@pytest.fixture
def s3(moto_server, monkeypatch) -> Bucket:
    import boto3

    aws_environment(monkeypatch, moto_server)
    client = boto3.client("s3", endpoint_url=moto_server, region_name=REGION)
    name = f"t{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    return Bucket(name, moto_server, client)


# --------------------------------------------------------------------------- the fault proxy


@dataclass
class Fault:
    """Answers up to ``times`` matching requests: ``kind`` is "status" (with ``status``),
    "reset" (before any response byte), "reset-body" (a reset after half the body), "cut-body"
    (the connection closed cleanly after half the body: the client gets exactly that half), or
    "delay" (``delay`` seconds before forwarding)."""

    kind: str
    times: int
    status: int = 503
    delay: float = 0.0
    method: str | None = None
    path: str | None = None  # a substring of the request path (bucket/key?query)
    ranged: bool | None = None  # only requests with (True) or without (False) a Range header
    injected: int = 0

    def matches(self, method: str, path: str, headers) -> bool:
        return (self.injected < self.times and (self.method is None or method == self.method)
                and (self.path is None or self.path in path)
                and (self.ranged is None or ("Range" in headers) == self.ranged))


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    fault: str | None


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    log: list[Logged] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def inject(self, kind: str, times: int = 1, **match) -> Fault:
        fault = Fault(kind, times, **match)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.log.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Logged]:
        with self.lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (path is None or path in r.path)]

    def _take(self, method: str, path: str, headers) -> Fault | None:
        with self.lock:
            fault = next((f for f in self.faults if f.matches(method, path, headers)), None)
            if fault is not None:
                fault.injected += 1
            self.log.append(Logged(method, path, headers.get("Range"), fault.kind if fault else None))
            return fault


def _handler(proxy: FaultProxy):
    host, port = proxy.upstream.split("://", 1)[1].split(":")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _reset(self) -> None:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = proxy._take(self.command, self.path, self.headers)
            if fault is not None and fault.kind == "status":
                payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                           b"<Message>injected by the test proxy</Message></Error>")
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if fault is not None and fault.kind == "reset":
                self._reset()
                return
            if fault is not None and fault.kind == "delay":
                proxy.released.wait(fault.delay)  # the fixture's teardown cuts it short
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                out_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
                declared = response.getheader("Content-Length")
            finally:
                upstream.close()
            no_body = self.command == "HEAD" or response.status in (204, 304)
            self.send_response(response.status)
            for k, v in out_headers:
                self.send_header(k, v)
            self.send_header("Content-Length", declared if no_body and declared else str(len(data)))
            self.end_headers()
            if no_body:
                return
            if fault is not None and fault.kind in ("reset-body", "cut-body"):
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if fault.kind == "reset-body":
                    self._reset()
                else:
                    self.connection.shutdown(socket.SHUT_WR)
                    self.close_connection = True
                return
            self.wfile.write(data)

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except (ConnectionError, OSError):
                self.close_connection = True

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler


@pytest.fixture
def fault_proxy(moto_server):
    proxy = FaultProxy(moto_server)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.released.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


# --------------------------------------------------------------------------- the network shaper

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))


@pytest.fixture
def link(moto_server):
    """tools/netshaper.py's ``Shaper`` in front of the S3 server, started: 10 ms (+/- 2 ms) to a
    response's first byte, 32 MB/s per connection, no bound on the link; a test may change
    its settings (``link.set(...)``) and set ``link.fault``."""
    from netshaper import Settings, Shaper

    shaper = Shaper(moto_server, Settings(delay=0.01, jitter=0.002, conn_rate=32e6, link_rate=None)).start()
    yield shaper
    shaper.stop()
