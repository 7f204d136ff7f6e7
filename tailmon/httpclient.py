"""One small HTTP client for every outbound request tailmon makes (endpoint judge, OpenAI-compatible
engine, webhook and Alertmanager sinks), with the limits a remote side must not be able to escape:

* **No redirects.** A 3xx reply is a `Redirected` failure naming both URLs (credentials masked).
  urllib's default opener follows them, turning a POST into a body-less GET and sending the
  `Authorization` header to whatever host the `Location` names; a receiver that moved must be
  reconfigured by its operator, not followed with a bearer token.
* **A total deadline per request.** `timeout` bounds the whole exchange (connect, request,
  status line, headers, body), not each socket read: a server dripping one byte a second keeps a
  per-read timeout from ever firing. A watchdog thread shuts the request's socket down when its
  deadline passes, which ends any read in progress; the request then fails with `TimedOut`.
  (Over HTTPS the TLS socket is registered once its handshake is done; the handshake's own reads
  are bounded by `timeout` each.)
* **A body size cap.** The reply is read in chunks and the request fails with `TooLarge` as soon
  as more than `max_bytes` arrive (or a Content-Length says so), so a 600 MB reply costs at most
  `max_bytes` of memory. Callers that only need the status (alert sinks) pass `truncate=True`:
  the rest of the body is then left unread.

Built on the standard library (urllib for proxies from the environment and TLS defaults,
http.client underneath); nothing here follows the environment's `.netrc` or cookies.
"""

from __future__ import annotations

import functools
import heapq
import http.client
import itertools
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import Message

from tailmon import redact
from tailmon.errors import RuntimeFailure

CHUNK = 64 * 1024


class HttpFailure(RuntimeFailure):
    """A request that got no usable reply: "URL: detail", the URL's credentials masked.
    `detail`: the message without the URL; `retryable`: whether trying again may help."""

    retryable = True

    def __init__(self, url: str, detail: str):
        super().__init__(f"{url}: {detail}")
        self.url, self.detail = url, detail


class Redirected(HttpFailure):
    """The server answered with a redirect, which tailmon never follows."""

    retryable = False

    def __init__(self, url: str, detail: str, status: int, location: str | None):
        super().__init__(url, detail)
        self.status, self.location = status, location


class TooLarge(HttpFailure):
    """The reply's body is larger than the request's cap."""

    retryable = False


class TimedOut(HttpFailure):
    """No complete reply within the request's total deadline."""


class Unreachable(HttpFailure):
    """The connection failed or broke (refused, reset, DNS, a malformed reply)."""


@dataclass
class Reply:
    status: int
    reason: str
    headers: Message
    body: bytes

    def text(self, limit: int = 200) -> str:
        """The body as one line of text, for error messages."""
        return " ".join(self.body[: limit * 4].decode("utf-8", "replace").split())[:limit]


def mask_url(url: str) -> str:
    """`url` without credentials: user info becomes `***@`, every query value `***` (a token
    in a query string is as secret as a password). tailmon.redact.mask_url, the one place that
    masks credentials, in its strict form."""
    return redact.mask_url(url, strict=True)


# -- the deadline watchdog ---------------------------------------------------------------------

class _Deadline:
    """One request's deadline and the sockets it opened (normally one)."""

    def __init__(self, at: float):
        self.at = at
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def fire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def release(self) -> None:
        """The request is over: from here on the watchdog touches none of its sockets."""
        with self._lock:
            self._sockets.clear()


def _shutdown(sock: socket.socket) -> None:
    # shutdown, not close: a read blocked in another thread returns at once (EOF), and the file
    # descriptor stays owned by http.client, which closes it (so it cannot be reused under us).
    # The plain socket's method, also for a TLS socket (the fd is the same): ssl.SSLSocket's own
    # shutdown also drops its TLS object, which the reading thread may still be using.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed, never connected, or detached into the TLS socket
        pass


class _Watchdog:
    """One daemon thread for every request's deadline (a heap ordered by time)."""

    def __init__(self):
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, deadline: _Deadline) -> None:
        with self._cv:
            heapq.heappush(self._heap, (deadline.at, next(self._ids), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tailmon-http-deadlines", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                at, _, deadline = self._heap[0]
                now = time.monotonic()
                if at > now:
                    self._cv.wait(at - now)
                    continue
                heapq.heappop(self._heap)
            deadline.fire()  # released requests have no sockets left: a no-op for them


_WATCHDOG = _Watchdog()


def _watched(base: type[http.client.HTTPConnection]):
    class Watched(base):
        def __init__(self, *args, deadline: _Deadline, **kwargs):
            super().__init__(*args, **kwargs)
            create = self._create_connection

            def create_and_watch(*a, **k):
                sock = create(*a, **k)
                deadline.watch(sock)
                return sock

            self._create_connection = create_and_watch
            self._deadline = deadline

        def connect(self):
            super().connect()
            if self.sock is not None:  # the TLS socket wrapping the TCP one (HTTPS)
                self._deadline.watch(self.sock)

    return Watched


_WatchedHTTP = _watched(http.client.HTTPConnection)
_WatchedHTTPS = _watched(http.client.HTTPSConnection)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, deadline=self._deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPS, deadline=self._deadline), req, context=self._context)


class _EveryStatus(urllib.request.HTTPErrorProcessor):
    """Hand every reply back as it is: no HTTPError for 4xx/5xx, and so no redirect handler ever
    runs for a 3xx (urllib follows redirects from its error path)."""

    def http_response(self, request, response):
        return response

    https_response = http_response


# -- requests ------------------------------------------------------------------------------------

def request(url: str, *, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
            timeout: float, max_bytes: int, truncate: bool = False) -> Reply:
    """One HTTP request within `timeout` seconds in all, its reply body capped at `max_bytes`.

    Returns the reply for any status that is not a redirect (the caller decides what 4xx and 5xx
    mean); raises `Redirected`, `TooLarge` (unless `truncate`: the body is then cut at the cap),
    `TimedOut` or `Unreachable`, each naming the URL with credentials masked.
    """
    shown = mask_url(url)
    deadline = _Deadline(time.monotonic() + timeout)
    opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline), _EveryStatus())
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    _WATCHDOG.add(deadline)
    response = None
    try:
        try:
            response = opener.open(req, timeout=timeout)
            status = response.status
            if 300 <= status < 400:
                location = response.headers.get("Location")
                target = mask_url(urllib.parse.urljoin(url, location)) if location else "nowhere"
                raise Redirected(shown, f"HTTP {status}, a redirect to {target}: tailmon does not follow "
                                 "redirects (they would carry its credentials to another place); configure the "
                                 "final URL", status, location)
            data = _read(response, max_bytes, truncate, shown)
            if deadline.expired:  # the watchdog's shutdown reads as the end of a body without a length
                raise TimedOut(shown, f"timed out (no answer within {timeout:g} s)")
            return Reply(status, response.reason or "", response.headers, data)
        except HttpFailure:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if deadline.expired or isinstance(_reason(exc), (TimeoutError, socket.timeout)):
                raise TimedOut(shown, f"timed out (no answer within {timeout:g} s)") from None
            raise Unreachable(shown, _describe(exc)) from None
    finally:
        deadline.release()
        if response is not None:
            response.close()


def _read(response, max_bytes: int, truncate: bool, shown: str) -> bytes:
    length = response.headers.get("Content-Length")
    if not truncate and length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise TooLarge(shown, f"the reply is {int(length)} bytes, more than the {_size(max_bytes)} tailmon reads")
    chunks, total = [], 0
    while total <= max_bytes:
        chunk = response.read(min(CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    if truncate:
        return b"".join(chunks)[:max_bytes]
    raise TooLarge(shown, f"the reply is larger than the {_size(max_bytes)} tailmon reads")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def _reason(exc: BaseException) -> BaseException:
    return exc.reason if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException) else exc


def _describe(exc: BaseException) -> str:
    reason = _reason(exc)
    if isinstance(reason, OSError) and reason.strerror:
        return f"{type(reason).__name__}: {reason.strerror}"
    text = str(reason)
    return f"{type(reason).__name__}: {text}" if text else type(reason).__name__


__all__ = ["HttpFailure", "Redirected", "Reply", "TimedOut", "TooLarge", "Unreachable", "mask_url", "request"]
