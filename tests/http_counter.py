"""A real HTTP server on 127.0.0.1 that answers every request with a small PNG and records it.

Tests that must send no request (refused protocols, redacted URLs, edited indexes) assert that ``requests`` stays
empty; tests of an allowed protocol see the image served. Used as a context manager, it stops its thread on exit.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.unit_helpers import solid_png


class CountingServer:
    def __init__(self, body: bytes | None = None):
        self.body = body if body is not None else solid_png((200, 10, 10), (16, 16))
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                outer.requests.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(outer.body)

            do_GET = do_HEAD = do_POST = do_PUT = _any  # noqa: N815 (http.server's names)

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> CountingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
