"""Bounds on what an input file may cost to read (README "Limits").

A path can name `/dev/zero`, a FIFO or a file far larger than any sane input; reading it whole
would take the process's memory (a daemon's reload would stall or die). Every reader of a whole
user file goes through `read_limited`, which reads at most one byte past its cap and then fails
with a one-line `InputError` naming the file and the cap.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from tailmon.errors import InputError

MiB = 1024 * 1024

MAX_CONFIG_BYTES = 1 * MiB
"""A YAML configuration (daemon config, perturbation file): ten thousand lines of it is plenty."""
MAX_LIST_FILE_BYTES = 8 * MiB
"""A keywords or refusal-patterns file (one term a line)."""
MAX_PROMPT_LINE_BYTES = 1 * MiB
"""One JSONL line (one prompt record): far past any model's context."""
MAX_JSON_PROMPTS_BYTES = 256 * MiB
"""A prompts file in the JSON-list format, which is parsed whole (JSONL streams; use it beyond)."""


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale and n % (scale // 1024 or 1) == 0:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


def read_limited(source: str | os.PathLike | BinaryIO, max_bytes: int, what: str) -> bytes:
    """The bytes of a path or an open binary stream, at most `max_bytes` of them; InputError
    ("WHAT is larger than N MiB") beyond. OSError from opening or reading propagates."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as stream:
            return read_limited(stream, max_bytes, what)
    data = source.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"{what} is larger than {size_text(max_bytes)}, the most tailmon reads of it")
    return data
