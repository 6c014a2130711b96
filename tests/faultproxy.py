"""An HTTP proxy in front of the loopback S3 server that injects faults, for fault-tolerance tests.

Every request is forwarded to the real S3 API (moto's server) unless the proxy decides to fail
it: ``fail_every=k`` answers every k-th request with 503 SlowDown (S3's throttling reply, which
clients retry with backoff), ``drop_every=k`` closes the connection of every k-th request
without answering, and ``always_fail`` answers 500 to every request whose path contains it (a
permanently broken object; with ``data_only`` only ranged reads past the start of the file fail,
so the header reads of planning succeed and the failure comes during the merge), and ``delay_s``
holds every ranged read past the start of a file that long before answering it (slow object
storage: first-byte latency), and ``stream_bytes_per_s`` caps how fast each such answer is sent
(object stores serve one request at a bounded rate; throughput comes from requests in parallel).
Counters are global and deterministic.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    """Start with ``with FaultProxy(upstream, fail_every=3) as proxy: proxy.url ...``."""

    def __init__(self, upstream: str, *, fail_every: int = 0, drop_every: int = 0, always_fail: str | None = None,
                 data_only: bool = False, delay_s: float = 0.0, stream_bytes_per_s: float = 0.0):
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.fail_every, self.drop_every, self.always_fail = fail_every, drop_every, always_fail
        self.data_only, self.delay_s, self.stream_bytes_per_s = data_only, delay_s, stream_bytes_per_s
        self.requests = self.failed = self.dropped = 0
        self.in_flight = self.max_in_flight = 0  # requests being served at once (concurrency seen)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    self._serve()
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            def _serve(self) -> None:
                body = self._body()
                action = proxy._decide(self.path, self.headers.get("Range", ""))
                if action == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if action in ("503", "500"):
                    code = "SlowDown" if action == "503" else "InternalError"
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(int(action))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                started = time.perf_counter()
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if action == "slow":  # latency, then the body at the capped rate
                    rate = proxy.stream_bytes_per_s
                    due = proxy.delay_s + (len(data) / rate if rate else 0.0)
                    time.sleep(max(0.0, due - (time.perf_counter() - started)))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _decide(self, path: str, range_header: str) -> str:
        with self._lock:
            self.requests += 1
            n = self.requests
            header_read = range_header.startswith("bytes=0-")
            if self.always_fail and self.always_fail in path and not (self.data_only and header_read):
                self.failed += 1
                return "500"
            if self.fail_every and n % self.fail_every == 0:
                self.failed += 1
                return "503"
            if self.drop_every and n % self.drop_every == 0:
                self.dropped += 1
                return "drop"
        if (self.delay_s or self.stream_bytes_per_s) and range_header.startswith("bytes=") and not header_read:
            return "slow"
        return "forward"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    """Run a proxy in its own process (benchmarks: no GIL shared with the client under test).

    Prints its URL on the first line of stdout; on SIGTERM writes its counters as JSON to
    ``--stats`` and exits.
    """
    import argparse
    import json
    import signal
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("upstream")
    ap.add_argument("--delay-s", type=float, default=0.0)
    ap.add_argument("--stream-bytes-per-s", type=float, default=0.0)
    ap.add_argument("--stats", required=True)
    args = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FaultProxy(args.upstream, delay_s=args.delay_s, stream_bytes_per_s=args.stream_bytes_per_s) as proxy:
        print(proxy.url, flush=True)
        stop.wait()
        with open(args.stats, "w") as f:
            json.dump({"requests": proxy.requests, "max_in_flight": proxy.max_in_flight}, f)
    sys.exit(0)


if __name__ == "__main__":
    main()
