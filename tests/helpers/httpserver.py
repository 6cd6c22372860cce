"""A local HTTP server on 127.0.0.1 with the URLs a real URL list holds, for tests and
bench/url_fetch_bench.py:

    /img/<name>          200, the image registered under <name>
    /robots/<values>/<name>  200, the image, with one X-Robots-Tag header per '|'-separated
                         value of <values> (URL-quoted)
    /flaky/<n>/<name>    503 for the first <n> requests of this path, then the image
    /status/<code>       that status (403, 404, 429, 503...), a short body
    /slow/<seconds>/<name>  the image, after <seconds>
    /drip/<seconds>      headers at once, then one byte per <seconds>
    /loop/<i>            302 to itself (a redirect loop)
    /html                200 text/html (a login page instead of an image)
    /reset               closes the connection without an answer

``server.requests`` counts requests per path; ``server.max_in_flight`` is the most requests
handled at once; ``server.user_agents`` the User-Agent headers seen.
"""

from __future__ import annotations

import collections
import http.server
import threading
import time
import urllib.parse
from typing import Optional


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "LocalHTTPServer"  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes, content_type: str = "application/octet-stream", headers: Optional[dict] = None,
              repeated: Optional[list[tuple[str, str]]] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in [*(headers or {}).items(), *(repeated or [])]:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # http.server's name for a GET handler
        owner = self.server.owner
        with owner.lock:
            owner.requests[self.path] += 1
            count = owner.requests[self.path]
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
            owner.user_agents.add(self.headers.get("User-Agent", ""))
        try:
            self._route(owner, count)
        finally:
            with owner.lock:
                owner.in_flight -= 1

    def _route(self, owner: "LocalHTTPServer", count: int) -> None:
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        kind = parts[0]
        if kind == "img":
            self._send(200, owner.images[parts[1]], "image/jpeg")
        elif kind == "robots":
            values = urllib.parse.unquote(parts[1]).split("|")
            self._send(200, owner.images[parts[2]], "image/jpeg", repeated=[("X-Robots-Tag", v) for v in values])
        elif kind == "flaky":
            if count <= int(parts[1]):
                self._send(503, b"busy", "text/plain", {"Retry-After": "0"})
            else:
                self._send(200, owner.images[parts[2]], "image/jpeg")
        elif kind == "status":
            self._send(int(parts[1]), b"no", "text/plain")
        elif kind == "slow":
            time.sleep(float(parts[1]))
            self._send(200, owner.images[parts[2]], "image/jpeg")
        elif kind == "drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                time.sleep(float(parts[1]))
                self.wfile.write(b"x")
                self.wfile.flush()
        elif kind == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind == "html":
            self._send(200, b"<!DOCTYPE html><html><body>Please log in</body></html>", "text/html")
        elif kind == "reset":
            self.close_connection = True
            self.connection.close()
        else:
            self._send(404, b"not found", "text/plain")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # clients that hang up are expected here
        pass


class LocalHTTPServer:
    def __init__(self, images: Optional[dict[str, bytes]] = None):
        self.images = dict(images or {})
        self.requests: collections.Counter = collections.Counter()
        self.user_agents: set[str] = set()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHTTPServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
