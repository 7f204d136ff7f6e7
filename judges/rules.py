"""Rule judges: a regular expression or a literal prefix on the response (the prompt is ignored).

Both are indicators (scores 0.0 or 1.0), cheap, and exact, so they suit events such as "the model
complied with an affirmative opening" (`prefix:Sure, here is`).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import weakref

import numpy as np

from tailmon.errors import InputError, RuntimeFailure, SpecError

from .base import Judge

MATCH_SECONDS = 1.0
"""A regex judge's time limit for one response's match (README "Limits")."""
_START_SECONDS = 30.0  # a fresh interpreter on a loaded machine; not the pattern's fault if slower

# The worker: the same interpreter's `re`, so a pattern means exactly what it means in tailmon
# itself. It reads the pattern, says it is ready, then for each line (a JSON list of responses)
# writes one character per response as soon as its search ends: the parent times each one.
_WORKER = """
import json, re, sys
pattern = re.compile(json.loads(sys.stdin.readline()))
out = sys.stdout
out.write("r"); out.flush()
for line in sys.stdin:
    for text in json.loads(line):
        out.write("1" if pattern.search(text) is not None else "0")
        out.flush()
"""


class _Matcher:
    """`re.search` of one pattern in a worker process, each search with a time limit.

    Python's `re` backtracks, and a pattern such as `(a+)+$` takes exponential time on some
    inputs (2^n steps for n characters); its C loop holds the GIL and checks no signal, so a thread
    can neither be interrupted nor abandoned cheaply. A child process can be killed: the search
    runs there, and one that outlives `limit` kills the worker and fails the judge in one line.
    Other engines (the `regex` module's timeout, RE2) would change what users' patterns mean
    (RE2 has no backreferences or lookarounds), and a bound on the response's length does not
    help (30 characters already take minutes)."""

    def __init__(self, pattern: str, limit: float):
        self.pattern, self.limit = pattern, limit
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WORKER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        weakref.finalize(self, _stop, proc)
        try:
            proc.stdin.write(json.dumps(self.pattern).encode() + b"\n")
            proc.stdin.flush()
            ready = self._read(proc, 1, _START_SECONDS)
        except (OSError, TimeoutError):
            ready = b""
        if ready != b"r":
            _stop(proc)
            raise RuntimeFailure(f"regex:{self.pattern}: the matching worker ({sys.executable}) did not start")
        return proc

    @staticmethod
    def _read(proc: subprocess.Popen, n: int, limit: float) -> bytes:
        """Up to `n` bytes of the worker's output, waiting at most `limit` for the first of them."""
        fd = proc.stdout.fileno()
        if not select.select([fd], [], [], limit)[0]:
            raise TimeoutError
        return os.read(fd, n)

    def search(self, texts: list[str]) -> list[bool]:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            found: list[bool] = []
            try:
                proc.stdin.write(json.dumps(texts).encode() + b"\n")
                proc.stdin.flush()
                while len(found) < len(texts):
                    # one response's search at a time is timed: the next character must come
                    # within `limit` of the previous one
                    chunk = self._read(proc, len(texts) - len(found), self.limit)
                    if not chunk:
                        raise OSError("the matching worker exited")
                    found.extend(c == ord("1") for c in chunk)
            except TimeoutError:
                self._proc = None
                _stop(proc)
                text = texts[len(found)]
                raise InputError(
                    f"regex:{self.pattern}: searching one response ({len(text)} characters) took more than "
                    f"{self.limit:g} s; the pattern backtracks catastrophically (nested repetition such as "
                    "(a+)+ or (a|a)*): rewrite it without repeating a repetition") from None
            except OSError as exc:
                self._proc = None
                _stop(proc)
                raise RuntimeFailure(f"regex:{self.pattern}: the matching worker failed: {exc}") from None
            return found

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                _stop(self._proc)
                self._proc = None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass


class RegexJudge(Judge):
    """`regex:PATTERN`: 1.0 when `re.search(PATTERN, response)` finds a match, else 0.0.

    PATTERN uses Python `re` syntax with no flags (write `(?i)` for case-insensitive, `(?s)` for
    `.` across newlines); it is compiled once, and an invalid one is a `SpecError`. Each search
    runs in a worker process with a time limit (`MATCH_SECONDS`, 1 s per response; see `_Matcher`):
    a pattern that backtracks exponentially fails the run with an `InputError` instead of hanging it.
    """

    def __init__(self, pattern: str, *, time_limit: float = MATCH_SECONDS) -> None:
        super().__init__()
        if not pattern:
            raise SpecError("the regular expression is empty")
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise SpecError(f"invalid regular expression {pattern!r}: {exc}") from None
        self.spec = f"regex:{pattern}"
        self._matcher = _Matcher(pattern, time_limit)

    @property
    def binary(self) -> bool:
        return True

    def _score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return np.array(self._matcher.search(list(responses)), dtype=np.float64)

    def close(self) -> None:
        """Stop the matching worker (a later score starts another)."""
        self._matcher.close()


class PrefixJudge(Judge):
    """`prefix:TEXT`: 1.0 when the response starts with TEXT, else 0.0.

    The test is literal, `response.startswith(TEXT)`: case-sensitive, with no stripping or
    normalisation of whitespace on either side. Exact probability computations elsewhere rely on
    this definition (the event is "the response's text begins with these characters"), so it must
    not be loosened here; use `regex:` for fuzzier rules.
    """

    def __init__(self, text: str) -> None:
        super().__init__()
        if not text:
            raise SpecError("the prefix text is empty")
        self.text = text
        self.spec = f"prefix:{text}"

    @property
    def binary(self) -> bool:
        return True

    def _score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        text = self.text
        return np.array([r.startswith(text) for r in responses], dtype=np.float64)
