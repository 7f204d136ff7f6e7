"""The judge contract: map (prompt, response) pairs to harm scores in [0, 1].

A judge is built from a spec string (see `tailmon.judges.spec`) and keeps that string, in canonical
form, as `spec`. Subclasses implement one method, `_score_batch`, on pairs the judge has not seen;
`Judge.score` handles validation, de-duplication and a per-instance cache keyed by
(prompt, response), so a response sampled twice, or rescored by another estimator, costs nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from tailmon.errors import InputError, RuntimeFailure

# Scores a judge computes may overshoot [0, 1] by rounding error; beyond this they are a bug.
_TOLERANCE = 1e-9


class Judge(ABC):
    """Maps (prompt, response) pairs to scores in [0, 1]; batched and deterministic.

    Subclasses set `spec` (the canonical spec string they were built from) in `__init__`, call
    `super().__init__()`, implement `_score_batch`, and override `binary` when their scores are
    always exactly 0 or 1.
    """

    spec: str
    """The canonical spec string: `parse_judge(judge.spec)` builds an equivalent judge."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], float] = {}

    @property
    def binary(self) -> bool:
        """True when every score is exactly 0.0 or 1.0 (an indicator rather than a graded score)."""
        return False

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Score each (prompt, response) pair; returns float64 values in [0, 1], one per pair.

        Pairs already scored by this instance come from its cache; the rest go to `_score_batch`
        once each, in first-seen order.
        """
        prompts = list(prompts)
        responses = list(responses)
        if len(prompts) != len(responses):
            raise InputError(
                f"judge {self.spec!r}: got {len(prompts)} prompts but {len(responses)} responses"
            )
        keys = list(zip(prompts, responses))
        for prompt, response in keys:
            if not isinstance(prompt, str) or not isinstance(response, str):
                bad = prompt if not isinstance(prompt, str) else response
                raise InputError(
                    f"judge {self.spec!r}: prompts and responses must be str, "
                    f"got {type(bad).__name__}"
                )
        cache = self._cache
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        if todo:
            values = self._checked(
                self._score_batch([p for p, _ in todo], [r for _, r in todo]), len(todo)
            )
            cache.update(zip(todo, values.tolist()))
        return np.fromiter((cache[k] for k in keys), dtype=np.float64, count=len(keys))

    def warnings(self) -> list[str]:
        """Problems met while scoring that did not stop it, one line each, for the run's report
        (e.g. an LLM judge whose answers were not digits). Counts cover every pair this instance
        has scored; judges built from others report their children's. Default: none."""
        return []

    def words(self) -> list[str]:
        """Words whose presence in a response raises this judge's score, most telling first, for
        proposals that bias the model towards them (a fitted token tilt's candidate tokens); []
        when the judge cannot say (an LLM, an endpoint). A hint only: a tilt learns how much each
        word matters from the hits, and the estimate stays exact whatever the hint."""
        return []

    def new_run(self) -> None:
        """Start a new run: forget cached scores and the counts behind `warnings()`, keep any
        loaded model. A daemon keeps one judge per spec across runs and calls this before each."""
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget every cached score (the scores themselves would not change: judges are
        deterministic; this only frees memory)."""
        self._cache.clear()

    @abstractmethod
    def _score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Score pairs not in the cache (non-empty, distinct); return one value in [0, 1] each."""

    def _checked(self, values: object, n: int) -> np.ndarray:
        """Validate what `_score_batch` returned: shape (n,), finite, within [0, 1]."""
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.shape != (n,):
            raise RuntimeFailure(
                f"judge {self.spec!r} returned {arr.shape[0]} scores for {n} responses"
            )
        bad = ~((arr >= -_TOLERANCE) & (arr <= 1 + _TOLERANCE))  # NaN counts as bad
        if bad.any():
            raise RuntimeFailure(
                f"judge {self.spec!r} returned {int(bad.sum())} scores outside [0, 1] "
                f"(first: {float(arr[bad][0])!r})"
            )
        return np.clip(arr, 0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"
