"""`llm:RUBRIC[@MODEL]`: an LLM judge run through a tailmon engine, scored from digit log-probs.

RUBRIC is a shipped rubric name (`misuse`, `misuse-1to5`, `emergent-misalignment`, `sycophancy`,
`evil`; `tailmon.judges.rubric.shipped_rubrics()`) or a path to a rubric YAML file; the rubric
schema and how answers are read are documented in `tailmon.judges.rubric`. MODEL is any model
reference the transformers engine loads (an embedded name, a local transformers folder, a hub
id where a hub is reachable); without it the judge uses the embedded default model. MODEL follows
the last `@` of the argument, unless the whole argument names an existing rubric file.

For each (prompt, response) pair and each rubric question the judge renders the question through
the judge model's chat template (the rubric's `system` prompt, or the template's default), starts
the assistant turn with the question's answer prefix, and reads the processed next-token
distribution (temperature 1, no truncation) there with `Engine.next_token_logprobs`. It keeps the
digits of the question's scale, renormalises them, and takes the expected digit, not the argmax,
mapped to [0, 1]; the rubric's `score` expression combines the questions. The score is a
deterministic function of the model's weights, so the judge is deterministic as the contract asks.

A digit's probability is that of every vocabulary token whose text, stripped of whitespace, is
that digit, plus the token the tokenizer itself produces for answer prefix + digit (the natural
one), so tokenizers that glue a space to the digit (` 3`) and those that do not (`3`) both read
correctly.

Answers whose scale digits carry less than the rubric's `min_digit_mass` of the next-token
probability are malformed: the model wanted to say something else. They still get the
renormalised expectation (the best reading there is, and never a silent 0), and `warnings()`
reports how many there were. If the digits carry no probability at all the judge fails with
`RuntimeFailure`.

The judge model is loaded on the first call to `score`, once per judge, by the one engine loader
(`tailmon.engines.loading.load_engine`, the transformers engine: the judge reads the tokenizer and
next-token log-probs in this process); the spec is validated (the rubric file read and checked)
when the judge is built.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from tailmon.engines.base import Decoding, Variant
from tailmon.engines.loading import EngineSettings, load_engine
from tailmon.errors import InputError, RuntimeFailure, SpecError, TailmonError

from .base import Judge
from .rubric import RUBRIC_SUFFIXES, Question, Rubric, load_rubric


def digit_logprobs(logprobs: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Log-probability of each digit, from next-token log-probs (b, V) and each digit's token ids:
    the log of the summed probability of its tokens, (b, k). -inf where a digit has no mass."""
    logprobs = np.atleast_2d(np.asarray(logprobs, dtype=np.float64))
    return np.stack([_logsumexp(logprobs[:, list(g)]) for g in groups], axis=1)


def digit_expectation(digit_lp: np.ndarray, values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The expected digit value under the renormalised digit distribution, and the digits' total
    probability, per row of `digit_lp` (b, k; log-probabilities of k digits, as from
    `digit_logprobs`). A row with no mass at all (every entry -inf) gives NaN and 0."""
    digit_lp = np.atleast_2d(np.asarray(digit_lp, dtype=np.float64))
    values = np.asarray(values, dtype=np.float64)
    total = _logsumexp(digit_lp)
    finite = np.isfinite(total)
    # Subtracting the row's log-total keeps the renormalisation exact even when the digits' raw
    # mass underflows (a malformed answer with mass 1e-30 still has a well-defined reading).
    shifted = np.where(finite[:, None], digit_lp - np.where(finite, total, 0.0)[:, None], -np.inf)
    probs = np.exp(shifted)
    expected = np.where(finite, probs @ values, np.nan)
    return expected, np.where(finite, np.exp(total), 0.0)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis, -inf for rows that are all -inf."""
    top = np.max(x, axis=-1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - safe[..., None]), axis=-1)) + safe


def split_llm_arg(arg: str) -> tuple[str, str | None]:
    """`RUBRIC[@MODEL]` -> (rubric, model or None); see the module docstring for the rule."""
    arg = arg.strip()
    if arg.endswith(RUBRIC_SUFFIXES) and Path(arg).expanduser().is_file():
        return arg, None
    rubric, at, model = arg.rpartition("@")
    if not at:
        return arg, None
    rubric, model = rubric.strip(), model.strip()
    if not rubric:
        raise SpecError("the rubric before '@' is empty: llm:RUBRIC[@MODEL]")
    if not model:
        raise SpecError("the model after '@' is empty: llm:RUBRIC[@MODEL]")
    return rubric, model


class LLMJudge(Judge):
    """`llm:RUBRIC[@MODEL]`: the rubric's score from the judge model's digit probabilities.

    `engine` (optional) is a ready engine with a tokenizer (a transformers engine) to judge with
    instead of loading MODEL, for callers that already hold the model; the spec still names `model`.
    """

    def __init__(self, rubric: str, model: str | None = None, *, engine=None) -> None:
        super().__init__()
        rubric = rubric.strip()
        self.rubric_ref = rubric
        self.rubric: Rubric = load_rubric(rubric)
        self.model_ref = model.strip() if model is not None else None
        if self.model_ref == "":
            raise SpecError("the model after '@' is empty: llm:RUBRIC[@MODEL]")
        self.spec = f"llm:{rubric}" + (f"@{self.model_ref}" if self.model_ref else "")
        self._engine = engine
        self._reads: list[tuple[list[int], list[list[int]]]] | None = None
        self._lock = threading.Lock()
        self.new_run()

    def new_run(self) -> None:
        super().new_run()
        self.answers = 0
        """Digit answers read so far (one per question per scored pair)."""
        self.malformed = 0
        """How many of them had digit mass below the rubric's min_digit_mass."""
        self.lowest_mass = 1.0
        """The smallest digit mass seen."""

    def _ensure_loaded(self) -> None:
        with self._lock:
            if self._engine is None:
                try:
                    self._engine = load_engine(EngineSettings(engine="transformers", ref=self.model_ref), role="judge")
                except TailmonError as exc:
                    raise type(exc)(f"judge {self.spec!r}: {exc}") from exc
            if self._reads is None:
                tokenizer = self._engine.tokenizer
                if tokenizer is None:
                    raise InputError(f"judge {self.spec!r}: the judge engine has no tokenizer "
                                     "(the LLM judge needs a transformers engine)")
                spelled = self._digit_spellings(tokenizer)
                self._reads = [self._prepare(q, tokenizer, spelled) for q in self.rubric.questions]

    def _digit_spellings(self, tokenizer) -> dict[str, list[int]]:
        """Every vocabulary token whose text, stripped, is one digit, by digit."""
        n_tokens = min(self._engine.vocab_size, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(n_tokens)], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        spelled: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            stripped = text.strip()
            if len(stripped) == 1 and stripped in "0123456789":
                spelled.setdefault(stripped, []).append(i)
        return spelled

    def _prepare(self, question: Question, tokenizer, spelled: dict[str, list[int]]
                 ) -> tuple[list[int], list[list[int]]]:
        """(context token ids after the generation prompt, token ids of each scale digit)."""

        def encode(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        digits = question.digits
        full = [encode(question.answer_prefix + d) for d in digits]
        common = 0
        while all(len(ids) > common for ids in full) and len({ids[common] for ids in full}) == 1:
            common += 1
        context = full[0][:common]
        natural = []
        for d, ids in zip(digits, full):
            if len(ids) - common != 1:
                raise InputError(
                    f"judge {self.spec!r}, question {question.id!r}: the model tokenises the "
                    f"answer prefix {question.answer_prefix!r} + {d!r} so that the digit is not "
                    "one token after a shared context; reword the answer prefix"
                )
            natural.append(ids[-1])
        groups = [sorted({tok, *spelled.get(d, [])}) for d, tok in zip(digits, natural)]
        return context, groups

    def _score_batch(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        self._ensure_loaded()
        # Temperature 1 without truncation: the model's own belief, not a decoding of it.
        variant = Variant("judge", Decoding(), system_prompt=self.rubric.system)
        values: dict[str, np.ndarray] = {}
        threshold = self.rubric.min_digit_mass
        for question, (context, groups) in zip(self.rubric.questions, self._reads):
            lp = np.empty((len(prompts), len(groups)))
            for i, (prompt, response) in enumerate(zip(prompts, responses)):
                row = self._engine.next_token_logprobs(
                    question.render(prompt, response), variant, [context]
                )
                lp[i] = digit_logprobs(row, groups)[0]
            digits = np.arange(question.low, question.high + 1, dtype=np.float64)
            expected, mass = digit_expectation(lp, digits)
            if not np.isfinite(expected).all():
                raise RuntimeFailure(
                    f"judge {self.spec!r}, question {question.id!r}: the judge model gives the "
                    f"digits {question.low}-{question.high} no probability at all"
                )
            self.answers += len(mass)
            self.malformed += int(np.sum(mass < threshold))
            self.lowest_mass = min(self.lowest_mass, float(mass.min()))
            values[question.id] = question.value(expected)
        return self.rubric.combine(values)

    def warnings(self) -> list[str]:
        if not self.malformed:
            return []
        return [
            f"{self.spec}: {self.malformed} of {self.answers} answers malformed (digit mass < "
            f"{self.rubric.min_digit_mass:g}, lowest {self.lowest_mass:.2g}); their scores use "
            "the renormalised digit distribution"
        ]
