"""The estimation pipeline: one code path for `tailmon estimate`, the daemon and `tailmon check`.

For each prompt: draw fixed counts from every mixture component, score every sample under every
component it did not come from (the drawing component's log-prob comes from sampling itself),
weight by the balance heuristic, judge, estimate. Then aggregate over prompts and extrapolate.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from tailmon.engines.base import Engine, Variant
from tailmon.estimators import (
    Estimate,
    aggregate,
    balance_log_weights,
    extrapolate,
    importance_sampling,
    monte_carlo,
    parse_window,
)
from tailmon.errors import InputError
from tailmon.judges import Judge
from tailmon.monitor.prompts import PromptItem
from tailmon.proposals import Component, Proposal, build_mixture

METHODS = ("is", "mc")


@dataclass
class EstimationPlan:
    """Everything that defines an estimate, validated once before any model work."""

    target: Variant
    judge: Judge
    method: str = "is"
    proposals: Sequence[Proposal] = ()
    defensive: float = 0.1
    weights: Sequence[float] | None = None
    """Relative shares of the proposals in what `defensive` leaves; None: equal shares."""
    n_samples: int = 200
    seed: int = 0
    confidence: float = 0.95
    volume: float | None = None
    window: str = "1d"
    components: list[Component] = field(init=False, default_factory=list)

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if not (isinstance(self.seed, (int, np.integer)) and self.seed >= 0):
            raise InputError(f"seed must be an integer >= 0, got {self.seed}")  # numpy's SeedSequence needs it
        if int(self.n_samples) != self.n_samples or self.n_samples < 1:
            raise InputError(f"samples per prompt must be an integer >= 1, got {self.n_samples}")
        if self.volume is not None and not self.volume >= 0:
            raise InputError(f"--volume must be >= 0, got {self.volume}")
        parse_window(self.window)
        if self.method == "is":
            self.components = build_mixture(self.target, list(self.proposals), self.defensive, self.weights)
        else:
            if self.proposals:
                raise InputError("--method mc samples the target only: drop the --proposal options or use --method is")
            self.components = [Component("target", self.target, 1.0)]


def allocate(n: int, shares: Sequence[float]) -> list[int]:
    """Integer sample counts n_j close to share_j * n (largest remainder), summing to n."""
    raw = np.asarray(shares, dtype=float) * n
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[j] += 1
    return counts.tolist()


def component_seed(seed: int, prompt: str, j: int) -> int:
    """Seed for one prompt and component: independent of prompt order, so reruns match."""
    return int(np.random.SeedSequence([seed, zlib.crc32(prompt.encode()), j]).generate_state(1)[0])


@dataclass
class PromptResult:
    prompt: PromptItem
    estimate: Estimate
    responses: list[str]
    scores: np.ndarray
    log_weights: np.ndarray | None
    component: np.ndarray

    def to_dict(self) -> dict:
        return {"prompt": self.prompt.text, "category": self.prompt.category, **self.estimate.to_dict()}


def estimate_prompt(engine: Engine, plan: EstimationPlan, prompt: PromptItem,
                    progress: Callable[[int], None] | None = None) -> PromptResult:
    comps = plan.components
    counts = allocate(plan.n_samples, [c.share for c in comps])
    ids: list[list[int]] = []
    drawn_by: list[int] = []
    own_logq: list[float] = []
    for j, (comp, n_j) in enumerate(zip(comps, counts)):
        if n_j == 0:
            continue
        samples = engine.sample(prompt.text, comp.variant, n_j, component_seed(plan.seed, prompt.text, j))
        ids += samples.token_ids
        own_logq += samples.logprobs.tolist()
        drawn_by += [j] * n_j
        if progress:
            progress(n_j)
    drawn = np.asarray(drawn_by)
    texts = [engine.decode(r) for r in ids]
    scores = plan.judge.score([prompt.text] * len(texts), texts)

    if plan.method == "mc":
        est = monte_carlo(scores, confidence=plan.confidence)
        return PromptResult(prompt, est, texts, scores, None, drawn)

    # log q_j(y_i) for every sample and every component with a share, and log p for all samples.
    # The realised shares n_j / n (not the nominal ones) make the estimator exactly unbiased.
    shares = np.asarray(counts, dtype=float) / plan.n_samples
    needed = [j for j in range(len(comps)) if shares[j] > 0 or j == 0]
    logq = np.full((len(ids), len(comps)), -np.inf)
    logq[np.arange(len(ids)), drawn] = own_logq
    for j in needed:
        rows = np.flatnonzero(drawn != j)
        if rows.size:
            logq[rows, j] = _score_unique(engine, prompt.text, comps[j].variant, [ids[i] for i in rows])
    log_w = balance_log_weights(logq[:, 0], logq, shares)
    est = importance_sampling(log_w, scores, component=drawn, defensive=float(shares[0]), confidence=plan.confidence)
    notes = tuple(c.note for c in comps if c.note)
    if notes:
        est = _with_warnings(est, notes)
    return PromptResult(prompt, est, texts, scores, log_w, drawn)


def _score_unique(engine: Engine, prompt: str, variant: Variant, responses: list[list[int]]) -> np.ndarray:
    """Score each distinct response once (short responses repeat often)."""
    keys = [tuple(r) for r in responses]
    unique = list(dict.fromkeys(keys))
    values = dict(zip(unique, engine.score(prompt, variant, [list(k) for k in unique])))
    return np.array([values[k] for k in keys])


def _with_warnings(est: Estimate, extra: tuple[str, ...]) -> Estimate:
    return replace(est, warnings=tuple(est.warnings) + extra)


@dataclass
class EstimationReport:
    model: str
    plan: EstimationPlan
    results: list[PromptResult]

    def aggregate(self):
        return aggregate([r.estimate for r in self.results], [r.prompt.category for r in self.results],
                         confidence=self.plan.confidence)

    def to_dict(self) -> dict:
        plan = self.plan
        agg = self.aggregate()
        agg_dict = agg.to_dict()
        if plan.volume is not None:
            agg_dict.update(extrapolate([r.estimate for r in self.results], agg, plan.volume, plan.window))
        d = plan.target.decoding
        return {
            "model": self.model,
            "method": plan.method,
            "judge": plan.judge.spec,
            "system_prompt": plan.target.system_prompt,
            "decoding": {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
                         "max_new_tokens": d.max_new_tokens},
            "components": [{"label": c.label, "share": c.share} for c in plan.components],
            "n_samples": plan.n_samples,
            "seed": plan.seed,
            "confidence": plan.confidence,
            "estimates": [r.to_dict() for r in self.results],
            "aggregate": agg_dict,
        }


def run_estimation(engine: Engine, plan: EstimationPlan, prompts: Sequence[PromptItem],
                   progress: Callable[[int], None] | None = None) -> EstimationReport:
    if not prompts:
        raise InputError("no prompts to estimate")
    results = [estimate_prompt(engine, plan, p, progress) for p in prompts]
    # A judge that had trouble (malformed LLM-judge answers, an endpoint without log-probs) says
    # so on every estimate it scored: a score it had to guess at is never a silent pass.
    judge_notes = tuple(plan.judge.warnings())
    if judge_notes:
        results = [replace(r, estimate=_with_warnings(r.estimate, judge_notes)) for r in results]
    return EstimationReport(engine.model_id, plan, results)


def attach_adapter_warnings(engine: Engine, plan: EstimationPlan) -> list[str]:
    """Load the adapter of every LoRA component before any sampling, and make every estimate of
    the run record the warning of one trained on another checkpoint.

    The engine refuses an adapter trained on another architecture or tokenizer (InputError); one
    trained on another checkpoint of the same loads (its weights stay exact, since p is always
    scored under the current target) with a warning, which this adds to the component's note, so
    that `estimate_prompt` puts it in each estimate's warnings. Returns the warnings. Engines
    without adapter checks (no `adapter_note`) are left alone.
    """
    notes = []
    if not hasattr(engine, "adapter_note"):
        return notes
    for i, comp in enumerate(plan.components):
        if comp.variant.adapter is None:
            continue
        note = engine.adapter_note(comp.variant.adapter)
        if note:
            notes.append(note)
            plan.components[i] = replace(comp, note="; ".join(n for n in (comp.note, note) if n))
    return notes
