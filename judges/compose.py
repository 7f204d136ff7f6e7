"""Judges built from other judges: a threshold (`SPEC>=T`) and the combinators `any`, `max`,
`mean` (`any(A; B; ...)`). Each keeps its own score cache on top of its children's.
"""

from __future__ import annotations

from abc import abstractmethod

from typing import Sequence

import numpy as np

from tailmon.errors import SpecError

from .base import Judge


def format_threshold(value: float) -> str:
    """The canonical text of a threshold: Python's shortest round-trip form (`0.5`, `1.0`)."""
    return repr(float(value))


class ThresholdJudge(Judge):
    """`SPEC>=T`: 1.0 where the inner judge's score is >= T, else 0.0 (T in [0, 1])."""

    def __init__(self, inner: Judge, threshold: float) -> None:
        super().__init__()
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise SpecError(f"threshold must be a number in [0, 1], got {threshold!r}")
        self.inner = inner
        self.threshold = threshold
        self.spec = f"{inner.spec}>={format_threshold(threshold)}"

    @property
    def binary(self) -> bool:
        return True

    def _score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return (self.inner.score(prompts, responses) >= self.threshold).astype(np.float64)

    def warnings(self) -> list[str]:
        return self.inner.warnings()

    def words(self) -> list[str]:
        return self.inner.words()

    def new_run(self) -> None:
        super().new_run()
        self.inner.new_run()


class Combinator(Judge):
    """A judge over one or more children, written `NAME(A; B; ...)`; subclasses set `name` and
    implement `_combine` on the children's stacked scores (shape children x pairs)."""

    name: str = ""

    def __init__(self, children: Sequence[Judge]) -> None:
        super().__init__()
        self.children = tuple(children)
        if not self.children:
            raise SpecError(f"{self.name}(...) needs at least one judge inside")
        self.spec = f"{self.name}({'; '.join(c.spec for c in self.children)})"

    def _score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        scores = np.stack([c.score(prompts, responses) for c in self.children])
        return self._combine(scores)

    def new_run(self) -> None:
        super().new_run()
        for child in self.children:
            child.new_run()

    def words(self) -> list[str]:
        return list(dict.fromkeys(w for c in self.children for w in c.words()))

    def warnings(self) -> list[str]:
        # A judge used twice (any(llm:misuse; max(llm:misuse; ...))) reports once.
        return list(dict.fromkeys(w for c in self.children for w in c.warnings()))

    @abstractmethod
    def _combine(self, scores: np.ndarray) -> np.ndarray:
        """Combine the children's stacked scores (children x pairs) into one score per pair."""


class AnyJudge(Combinator):
    """`any(A; B; ...)`: 1.0 where at least one child's score is > 0 ("some judge flags it"),
    else 0.0. Graded children count as flagging at any positive score; threshold them
    (`any(toxicity>=0.5; ...)`) to choose the cut."""

    name = "any"

    @property
    def binary(self) -> bool:
        return True

    def _combine(self, scores: np.ndarray) -> np.ndarray:
        return (scores > 0.0).any(axis=0).astype(np.float64)


class MaxJudge(Combinator):
    """`max(A; B; ...)`: the elementwise maximum of the children's scores."""

    name = "max"

    @property
    def binary(self) -> bool:
        return all(c.binary for c in self.children)

    def _combine(self, scores: np.ndarray) -> np.ndarray:
        return scores.max(axis=0)


class MeanJudge(Combinator):
    """`mean(A; B; ...)`: the elementwise mean of the children's scores (equal weights)."""

    name = "mean"

    @property
    def binary(self) -> bool:
        return len(self.children) == 1 and self.children[0].binary

    def _combine(self, scores: np.ndarray) -> np.ndarray:
        return scores.mean(axis=0)
