r"""`keywords:FILE`: a configurable lexicon of whole words and phrases (the prompt is ignored).

FILE is plain UTF-8 text, one term per line::

    # comments and blank lines are ignored
    [weapons]
    pipe bomb
    detonator
    [slurs]
    ...

A `[category]` line starts a section; terms before the first one belong to the category
`default`. Terms are stripped of edge whitespace; a line whose first non-blank character is `#` is
a comment (so a term cannot start with `#`). Matching is case-insensitive and whole-word: a term
matches as `\b` + `re.escape(term)` + `\b`, with each run of whitespace inside the term matching
any run of whitespace (`pipe bomb` matches `Pipe\n  bomb`), so `ass` does not match `class`. (The
boundaries are written `(?<!\w)` and `(?!\w)`, which equal `\b` for terms that start and end with
a word character and stay "whole word" for terms that do not, such as `c++`.)

The score is 1.0 when any term occurs, else 0.0; `KeywordsJudge.matches(response)` says which terms
did, by category, for reports.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tailmon.errors import InputError, SpecError
from tailmon.limits import MAX_LIST_FILE_BYTES, read_limited

from .base import Judge

DEFAULT_CATEGORY = "default"
_SECTION_RE = re.compile(r"\[(.*)\]\Z")
_SPACE_RE = re.compile(r"\s+")


def read_list_file(path: str, what: str) -> list[tuple[int, str]]:
    """(line number, stripped line) for each line of `path` that is neither blank nor a `#`
    comment; an unreadable file, or one with no such line, is an `InputError` naming it (`what`
    says what the file was for)."""
    try:
        # At most MAX_LIST_FILE_BYTES (README "Limits"): /dev/zero or a huge file fails in one line.
        text = read_limited(Path(path), MAX_LIST_FILE_BYTES, f"{what} file {path!r}").decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} file {path!r}: {exc}") from None
    lines = [(n, s) for n, s in enumerate(text.splitlines(), 1) if s.strip()]
    lines = [(n, s.strip()) for n, s in lines if not s.strip().startswith("#")]
    if not lines:
        raise InputError(f"{what} file {path!r} has no entries (only blank or # comment lines)")
    return lines


def term_pattern(term: str) -> str:
    """The whole-word, whitespace-tolerant regex (without flags) for a literal term."""
    body = r"\s+".join(re.escape(word) for word in _SPACE_RE.split(term.strip()))
    return rf"(?<!\w){body}(?!\w)"


class KeywordsJudge(Judge):
    """`keywords:FILE`: 1.0 when any term of the lexicon in FILE occurs as a whole word or phrase
    (case-insensitive), else 0.0. The file is read once, at construction."""

    def __init__(self, path: str) -> None:
        super().__init__()
        path = path.strip()
        if not path:
            raise SpecError("the keywords file name is empty")
        self.path = path
        self.spec = f"keywords:{path}"
        self.terms: dict[str, list[str]] = {}
        category = DEFAULT_CATEGORY
        for lineno, line in read_list_file(path, "keywords"):
            section = _SECTION_RE.match(line)
            if section is not None:
                category = section.group(1).strip()
                if not category:
                    raise InputError(f"keywords file {path!r}, line {lineno}: empty [category]")
                continue
            terms = self.terms.setdefault(category, [])
            if line not in terms:
                terms.append(line)
        if not any(self.terms.values()):
            raise InputError(f"keywords file {path!r} has no terms (only [category] lines)")
        self._patterns = {
            category: [(t, re.compile(term_pattern(t), re.IGNORECASE)) for t in terms]
            for category, terms in self.terms.items()
        }
        every = dict.fromkeys(t for terms in self.terms.values() for t in terms)
        self._words = list(every)
        self._any = re.compile("|".join(term_pattern(t) for t in every), re.IGNORECASE)

    @property
    def binary(self) -> bool:
        return True

    def matches(self, response: str) -> dict[str, list[str]]:
        """The terms found in `response`, by category, in file order; categories without a match
        are left out (so an empty dict means a score of 0.0)."""
        found: dict[str, list[str]] = {}
        for category, patterns in self._patterns.items():
            hits = [term for term, pattern in patterns if pattern.search(response)]
            if hits:
                found[category] = hits
        return found

    def words(self) -> list[str]:
        return list(self._words)

    def _score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        search = self._any.search
        return np.array([search(r) is not None for r in responses], dtype=np.float64)
