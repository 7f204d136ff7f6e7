"""A hostile HTTP server on 127.0.0.1 (http.server in a thread), for the limits of tailmon's HTTP
client (tailmon.httpclient) and of everything built on it (endpoint judge, OpenAI engine, sinks).

Routes (any method; a POST's body is read first):
  /redirect-cross  302 to the *other* server's /steal (another origin: another port)
  /redirect-same   307 to /ok on this server
  /drip-headers    the status line and headers one byte every `drip` seconds
  /drip-body       headers at once (Content-Length 1000), then the body one byte every `drip` seconds
  /huge            200 with no Content-Length, then `huge` bytes of JSON-ish filler as fast as it goes
  /huge-declared   200 with Content-Length: 600 MB, and a few bytes
  anything else    200 {"ok": true}
Every request's path and headers are recorded in `requests` (of the server that got it).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HostileServer:
    def __init__(self, *, drip: float = 0.2, huge: int = 50 * 1024 * 1024, other: "HostileServer | None" = None,
                 tls: tuple[str, str] | None = None):
        """`tls`: (certificate file, key file) to serve HTTPS instead of HTTP."""
        self.drip, self.huge, self.other = drip, huge, other
        self.requests: list[tuple[str, str, dict]] = []
        self.sent = 0  # bytes of /huge bodies written so far
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                server.requests.append((self.command, self.path, dict(self.headers)))
                try:
                    server.route(self)
                except OSError:  # the client gave up on us (reset, broken pipe, TLS EOF): expected
                    pass

            do_GET = do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def route(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path
        if path.startswith("/redirect-cross"):
            target = (self.other.url if self.other else "http://127.0.0.1:9") + "/steal"
            self._plain(h, 302, b"", {"Location": target})
        elif path.startswith("/redirect-same"):
            self._plain(h, 307, b"", {"Location": "/ok"})
        elif path.startswith("/drip-headers"):
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
            for i in range(len(head)):
                h.wfile.write(head[i:i + 1])
                h.wfile.flush()
                time.sleep(self.drip)
        elif path.startswith("/drip-body"):
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            for _ in range(1000):
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(self.drip)
        elif path.startswith("/huge-declared"):
            h.send_response(200)
            h.send_header("Content-Length", str(600 * 1024 * 1024))
            h.end_headers()
            h.wfile.write(b"[" * 1024)
        elif path.startswith("/huge"):
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            block = b'{"pad": "' + b"x" * 65000 + b'"},'
            while self.sent < self.huge:
                h.wfile.write(block)
                self.sent += len(block)
            h.close_connection = True
        else:
            self._plain(h, 200, json.dumps({"ok": True}).encode(), {"Content-Type": "application/json"})

    @staticmethod
    def _plain(h, status: int, body: bytes, headers: dict) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def hostile_pair(**knobs) -> tuple[HostileServer, HostileServer]:
    """(the server under test, the other origin its /redirect-cross points to)."""
    other = HostileServer(**{k: v for k, v in knobs.items() if k != "tls"})
    return HostileServer(other=other, **knobs), other
