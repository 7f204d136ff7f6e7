"""Rule judges: a regular expression or a literal prefix on the response (the prompt is ignored).

Both are indicators (scores 0.0 or 1.0), cheap, and exact, so they suit events such as "the model
complied with an affirmative opening" (`prefix:Sure, here is`).
"""

from __future__ import annotations

import re

import numpy as np

from tailmon.errors import SpecError

from .base import Judge


class RegexJudge(Judge):
    """`regex:PATTERN`: 1.0 when `re.search(PATTERN, response)` finds a match, else 0.0.

    PATTERN uses Python `re` syntax with no flags (write `(?i)` for case-insensitive, `(?s)` for
    `.` across newlines); it is compiled once, and an invalid one is a `SpecError`.
    """

    def __init__(self, pattern: str) -> None:
        super().__init__()
        if not pattern:
            raise SpecError("the regular expression is empty")
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise SpecError(f"invalid regular expression {pattern!r}: {exc}") from None
        self.spec = f"regex:{pattern}"

    @property
    def binary(self) -> bool:
        return True

    def _score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        search = self.pattern.search
        return np.array([search(r) is not None for r in responses], dtype=np.float64)


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
