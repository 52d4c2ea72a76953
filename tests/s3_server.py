"""A real S3 endpoint on 127.0.0.1 for the tests, and a proxy in front of it that injects faults.

The server is moto's server mode (``python -m moto.server``), the same one s3fs's
own tests use: real HTTP, real S3 wire protocol, and the same client code users
run against AWS S3 or MinIO. The :class:`FaultProxy` forwards requests to it and
can answer 500s, answer slowly, refuse writes (a read-only bucket) or stop in
the middle of a transfer, so the store's failure handling is tested against the
errors a client really sees.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """moto's S3 server on a free loopback port; ``stop()`` ends it."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto's S3 server did not start (is moto[server] installed? uv sync)")
                time.sleep(0.1)

    def environment(self, endpoint: str | None = None) -> dict:
        """The standard AWS variables that point any S3 client at this server (or at ``endpoint``)."""
        return {"AWS_ENDPOINT_URL": endpoint or self.url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def make_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.url}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_ERROR_BODY = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message>"
               "</Error>")


class FaultProxy:
    """An HTTP proxy to the S3 server whose ``mode`` says which fault to inject.

    Modes: ``pass``; ``error500`` (every request answers 500 InternalError);
    ``slow`` (waits ``delay`` seconds before answering); ``readonly`` (writes
    answer 403 AccessDenied); ``cut`` (a PUT is read halfway and the connection
    dropped; a GET sends its headers and half its body, then drops): the server
    stopped in the middle of a transfer, as the client sees it. ``only`` limits
    the fault to requests whose path holds that text (``"/blobs/"``: the artifacts).
    """

    def __init__(self, upstream_port: int):
        self.mode = "pass"
        self.only: str | None = None  # inject the fault only into requests whose path holds this
        self.delay = 5.0
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str, message: str) -> None:
                body = _ERROR_BODY.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                proxy.requests.append((self.command, self.path))
                mode = proxy.mode if proxy.only is None or proxy.only in self.path else "pass"
                if mode == "cut" and self.command == "PUT":
                    length = int(self.headers.get("Content-Length") or 0)
                    self.rfile.read(length // 2)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = self._body()
                if mode == "error500":
                    return self._error(500, "InternalError", "injected by the test proxy")
                if mode == "readonly" and self.command in ("PUT", "POST", "DELETE"):
                    return self._error(403, "AccessDenied", "Access Denied (read-only bucket)")
                if mode == "slow":
                    time.sleep(proxy.delay)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                cut = mode == "cut" and self.command == "GET" and answer.status in (200, 206) and len(data) > 1
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                # A HEAD answer has no body but tells the object's size (what a client's open() reads)
                length = answer.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if cut:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def aws_environment_cleared() -> dict:
    """The AWS_* variables of this process (so a test can restore them)."""
    return {key: value for key, value in os.environ.items() if key.startswith("AWS_")}
