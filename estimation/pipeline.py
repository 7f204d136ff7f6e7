"""The estimation pipeline: one code path for `tailmon estimate`, the daemon and `tailmon check`.

For each prompt: draw fixed counts from every mixture component, score every sample under every
component it did not come from (the drawing component's log-prob comes from sampling itself),
weight by the balance heuristic, judge, estimate. Then aggregate over prompts and extrapolate.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from tailmon.engines.base import Engine, Variant, checkpoint
from tailmon.errors import InputError, RuntimeFailure, TailmonError
from tailmon.estimation.efficiency import prompt_efficiency, run_efficiency
from tailmon.estimation.prompts import PromptItem
from tailmon.estimators import (
    Estimate,
    aggregate,
    extrapolate,
    importance_sampling,
    monte_carlo,
    parse_window,
)
from tailmon.judges import Judge
from tailmon.proposals import Component, Proposal, build_mixture
from tailmon.proposals.sampling import Draw, allocate, draw  # noqa: F401  (allocate: the pipeline's rule, re-exported)
from tailmon.redact import mask_secrets

METHODS = ("is", "mc")
# Samples per prompt at most (README "Limits"). A prompt's samples are held in memory together
# (responses, token ids, a log-prob per component), ~1 GB at this count with 64-token responses,
# and take hours on a GPU; a count past it is a typo (`--samples 1000000000`), not a plan.
MAX_SAMPLES = 100_000

RESCORE_SAMPLES = 8
"""Samples per prompt re-scored under the component that drew them (see `logprob_check`)."""
RESCORE_TOLERANCE = 0.01
"""Largest |sampled - re-scored| log-prob of one response (nats) that passes without a warning.

Derived from both sides: float32 transformers agree far below it (sampling and scoring compute
the same sums in another order: at most 4e-6 over 1500 8-token samples of the tiny test model,
at most 1.2e-4 over 64 responses of up to 64 tokens of the embedded SmolLM2-135M, 2 prompts x
2 variants, on a CPU), so it does not fire on an exact engine (80 times that margin);
and an error d in the drawing component's log-prob changes that sample's weight by a factor of
at most e^d, so 0.01 bounds it at 1%, below what any interval tailmon reports resolves at its
sample sizes. bf16 keeps 8 bits of mantissa (relative rounding 2^-9, about 2e-3): on logits of
size 10 to 30, decode and prefill kernels that round differently can move a token's log-prob
by 1e-2 nats or more, so a bf16 engine can exceed it over a response, and the estimate says so
(not measured here: no GPU was at hand; the check measures it on every run)."""


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
    rescore_samples: int = RESCORE_SAMPLES
    """Samples per prompt whose sampled log-prob is checked by scoring them again (0: none)."""
    rescore_tolerance: float = RESCORE_TOLERANCE
    """Nats; a larger difference puts a warning on the prompt's estimate."""
    components: list[Component] = field(init=False, default_factory=list)

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if not (isinstance(self.seed, (int, np.integer)) and self.seed >= 0):
            raise InputError(f"seed must be an integer >= 0, got {self.seed}", setting="seed")  # numpy's SeedSequence needs it
        if int(self.n_samples) != self.n_samples or self.n_samples < 1:
            raise InputError(f"samples must be an integer >= 1 (per prompt), got {self.n_samples}", setting="samples")
        if self.n_samples > MAX_SAMPLES:
            raise InputError(f"samples must be at most {MAX_SAMPLES} per prompt, got {self.n_samples}", setting="samples")
        if self.volume is not None and not (math.isfinite(self.volume) and self.volume >= 0):
            raise InputError(f"volume must be a finite number >= 0, got {self.volume}", setting="volume")
        parse_window(self.window)
        if isinstance(self.rescore_samples, bool) or int(self.rescore_samples) != self.rescore_samples \
                or self.rescore_samples < 0:
            raise InputError(f"rescore_samples must be an integer >= 0, got {self.rescore_samples}",
                             setting="rescore_samples")
        if not (math.isfinite(self.rescore_tolerance) and self.rescore_tolerance > 0):
            raise InputError(f"rescore_tolerance must be a finite number > 0 (nats), got {self.rescore_tolerance}",
                             setting="rescore_tolerance")
        if self.method == "is":
            self.components = build_mixture(self.target, list(self.proposals), self.defensive, self.weights)
        else:
            if self.proposals:
                raise InputError("method mc samples the target only: drop the proposals or use method is", setting="method")
            self.components = [Component("target", self.target, 1.0)]


def with_samples(plan: EstimationPlan, n_samples: int, seed: int | None = None) -> EstimationPlan:
    """`plan` with another sample count (and seed), its components kept as they are: rebuilding
    them (`replace` runs `__post_init__`) would drop the notes `attach_adapter_warnings` put there."""
    new = replace(plan, n_samples=n_samples, seed=plan.seed if seed is None else seed)
    new.components = list(plan.components)
    return new


def component_seed(seed: int, prompt: str, j: int, occurrence: int = 0) -> int:
    """Seed for one prompt, its draw index and one component: independent of prompt order, so
    reruns match, and of the model, so candidate and baseline share the stream (`tailmon check`).

    `occurrence` counts earlier draws of the same text in the run (0 for the first): a prompt
    drawn twice must give two independent estimates, not one counted twice. The first
    occurrence's entropy is the one used before the draw index existed, so existing runs
    reproduce.
    """
    entropy = [seed, zlib.crc32(prompt.encode()), j] + ([occurrence] if occurrence else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def occurrences(prompts: Sequence[PromptItem]) -> list[int]:
    """Each prompt's draw index: how many earlier prompts of the run have the same text."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        out.append(seen.get(p.text, 0))
        seen[p.text] = out[-1] + 1
    return out


@dataclass
class PromptResult:
    prompt: PromptItem
    estimate: Estimate
    responses: list[str]
    scores: np.ndarray
    log_weights: np.ndarray | None
    component: np.ndarray
    logprob_check: dict | None = None
    """The sampled vs re-scored log-prob check (`logprob_check`); None when none was made."""
    token_ids: list[list[int]] | None = None
    """The samples' token ids, and (next) their log-probs under every component and the realised
    shares: what an adaptive monitor learns from after the run (tailmon.proposals.adaptive)."""
    logq: np.ndarray | None = None
    shares: np.ndarray | None = None
    seconds: float | None = None
    """Wall time of the prompt's draw: generation, scoring and judging (None: not timed)."""
    plain_seconds_per_sample: float | None = None
    """Wall time one plain Monte Carlo sample costs, measured on this prompt's draw
    (`_plain_seconds_per_sample`; None: not timed)."""
    horizon: int | None = None
    """`logq` covers each sample's first `horizon` tokens only (every component returned to the
    target, tailmon.proposals.sampling.weight_horizon); None: whole responses."""

    @property
    def efficiency(self) -> dict:
        """`mc_equivalent_samples`, `mc_sample_ratio`, `mc_time_ratio` (tailmon.estimation.efficiency)."""
        return prompt_efficiency(self.estimate, self.seconds, self.plain_seconds_per_sample)

    def to_dict(self) -> dict:
        # The sample figures only: they follow from the estimate, so a rerun with the same seeds
        # gives the same dict. The time ratio is a wall-clock measurement: the report's `timing`.
        sample = {k: v for k, v in self.efficiency.items() if k != "mc_time_ratio"}
        out = {"prompt": self.prompt.text, "category": self.prompt.category, **self.estimate.to_dict(), **sample}
        if self.logprob_check is not None:
            out["logprob_check"] = dict(self.logprob_check)
        return out


def logprob_check(d, labels: Sequence[str], tolerance: float) -> tuple[dict | None, str | None]:
    """Compare the re-scored samples of a draw with their sampled log-probs: (summary, warning).

    The summary: `n` samples checked, `max_abs_diff` (nats; None when a re-scored log-prob is
    -inf: a sampled response outside the support it was drawn from), `n_over_tolerance`,
    `tolerance`. The warning (None when every difference is within tolerance) names the
    components concerned."""
    if d.checked.size == 0:
        return None, None
    sampled = d.logq[d.checked, d.drawn[d.checked]]
    diff = np.abs(sampled - d.rescored)
    diff[sampled == d.rescored] = 0.0  # both -inf: no difference (inf - inf is nan)
    over = ~(diff <= tolerance)  # nan or inf count as over
    worst = float(np.max(diff))
    summary = {"n": int(diff.size), "max_abs_diff": worst if math.isfinite(worst) else None,
               "n_over_tolerance": int(over.sum()), "tolerance": tolerance}
    if not over.any():
        return summary, None
    comps = ", ".join(dict.fromkeys(labels[j] for j in d.drawn[d.checked][over]))
    size = f"up to {worst:.3g} nats" if math.isfinite(worst) else "without bound (a scored log-prob is -inf)"
    return summary, (f"sampled and re-scored log-probs differ by {size} on {int(over.sum())} of {diff.size} "
                     f"re-scored samples (tolerance {tolerance:g} nats; component {comps}): the engine's "
                     "sampling and scoring are not the same function (bf16 decode and prefill kernels, "
                     "a cache), and the importance weights carry the difference")


def estimate_prompt(engine: Engine, plan: EstimationPlan, prompt: PromptItem,
                    progress: Callable[[int], None] | None = None, occurrence: int = 0) -> PromptResult:
    """One prompt's estimate; `occurrence`: its draw index in the run (see `component_seed`)."""
    comps = plan.components
    d = draw(engine, prompt.text, [c.variant for c in comps], [c.share for c in comps], plan.n_samples,
             seed=lambda j: component_seed(plan.seed, prompt.text, j, occurrence), judge=plan.judge, progress=progress,
             score_all=False, rescore=plan.rescore_samples if plan.method == "is" else 0)
    timing = {"seconds": d.seconds, "plain_seconds_per_sample": _plain_seconds_per_sample(d), "horizon": d.horizon}
    if plan.method == "mc":  # no weights: the sampled log-probs are not used
        est = monte_carlo(d.scores, confidence=plan.confidence)
        return PromptResult(prompt, est, d.texts, d.scores, None, d.drawn, None, d.ids, d.logq, d.shares, **timing)
    # The realised shares n_j / n (not the nominal ones) make the estimator exactly unbiased.
    log_w = d.log_w
    est = importance_sampling(log_w, d.scores, component=d.drawn, defensive=float(d.shares[0]),
                              confidence=plan.confidence)
    notes = tuple(c.note for c in comps if c.note)
    check, mismatch = logprob_check(d, [c.label for c in comps], plan.rescore_tolerance)
    if mismatch:
        notes += (mismatch,)
    if notes:
        est = _with_warnings(est, notes)
    return PromptResult(prompt, est, d.texts, d.scores, log_w, d.drawn, check, d.ids, d.logq, d.shares, **timing)


def _plain_seconds_per_sample(d: Draw) -> float | None:
    """What one sample of plain Monte Carlo costs (tailmon.estimation.efficiency): generation per
    sample, the smaller of the target stratum's (the deployed model's own samples, as MC draws
    them) and the whole draw's (every component, batches as large as MC's would be), plus the
    judge's time per sample. The smaller: neither can then make IS look cheaper than it is (a
    small target stratum pays a batch's fixed costs for few samples, a slow proposal (an adapter,
    a second prefill) makes the whole draw's generation slower than plain). None: not timed."""
    n = len(d.drawn)
    if d.generate_seconds is None or n == 0:
        return None
    gen = [float(np.sum(d.generate_seconds)) / n]
    n_target = int(np.count_nonzero(d.drawn == 0))
    if n_target:
        gen.append(float(d.generate_seconds[0]) / n_target)
    return min(gen) + d.judge_seconds / n


def _with_warnings(est: Estimate, extra: tuple[str, ...]) -> Estimate:
    return replace(est, warnings=tuple(est.warnings) + extra)


@dataclass
class EstimationReport:
    model: str
    plan: EstimationPlan
    results: list[PromptResult]
    engine: str = "transformers"

    def aggregate(self):
        return aggregate([r.estimate for r in self.results], [r.prompt.category for r in self.results],
                         confidence=self.plan.confidence)

    def to_dict(self, headline: dict | None = None) -> dict:
        """The JSON report. `headline`: this plan's volume and window already extrapolated (a
        daemon run extrapolates every window once), else it is computed here."""
        plan = self.plan
        agg = self.aggregate()
        agg_dict = agg.to_dict()
        per_prompt = [r.efficiency for r in self.results]
        run = run_efficiency(per_prompt, [r.estimate.n_samples for r in self.results], [r.seconds for r in self.results],
                             [r.plain_seconds_per_sample for r in self.results])
        agg_dict.update({k: v for k, v in run.items() if k != "mc_time_ratio"})
        if plan.volume is not None:
            agg_dict.update(headline if headline is not None else
                            extrapolate([r.estimate for r in self.results], agg, plan.volume, plan.window,
                                        confidence=plan.confidence))
        d = plan.target.decoding
        return {
            "model": self.model,
            "engine": self.engine,
            "method": plan.method,
            "judge": mask_secrets(plan.judge.spec, pairs=False),  # an endpoint judge's URL may carry a key
            "system_prompt": plan.target.system_prompt,
            "decoding": {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
                         "max_new_tokens": d.max_new_tokens},
            "components": [{"label": c.label, "share": c.share} for c in plan.components],
            "n_samples": plan.n_samples,
            "seed": plan.seed,
            "confidence": plan.confidence,
            "rescore": {"samples_per_prompt": plan.rescore_samples if plan.method == "is" else 0,
                        "tolerance": plan.rescore_tolerance},
            "estimates": [r.to_dict() for r in self.results],
            "aggregate": agg_dict,
            # Wall-clock measurements, laid out as the report (they vary between runs, everything
            # else reproduces with the seed): each prompt's draw time, what one plain MC sample
            # cost on it and its MC time ratio; the run's time and MC time ratio. None where no MC
            # equivalent is reported (tailmon.estimation.efficiency).
            "timing": {
                "estimates": [{"seconds": r.seconds, "plain_seconds_per_sample": r.plain_seconds_per_sample,
                               "mc_time_ratio": e["mc_time_ratio"]} for r, e in zip(self.results, per_prompt)],
                "aggregate": {"seconds": sum(r.seconds for r in self.results if r.seconds is not None),
                              "mc_time_ratio": run["mc_time_ratio"]},
            },
        }


def check_prompts(engine: Engine, plan: EstimationPlan, prompts: Sequence[PromptItem]) -> None:
    """Every prompt fits the model's context under every component (`Engine.check_prompt`),
    checked before any sampling: one prompt too long fails the run now, in one line naming its
    length, not after the prompts before it were estimated."""
    for i, p in enumerate(prompts):
        for c in plan.components:
            try:
                engine.check_prompt(p.text, c.variant)
            except InputError as exc:
                raise InputError(f"prompt {i + 1} of {len(prompts)} ({c.label}): {exc}") from None


def run_estimation(engine: Engine, plan: EstimationPlan, prompts: Sequence[PromptItem],
                   progress: Callable[[int], None] | None = None) -> EstimationReport:
    if not prompts:
        raise InputError("no prompts to estimate")
    check_prompts(engine, plan, prompts)
    results = []
    for p, k in zip(prompts, occurrences(prompts)):
        results.append(estimate_prompt(engine, plan, p, progress, k))
        checkpoint()  # between prompts: a daemon's run may stop here (its time limit, a shutdown)
    # A judge that had trouble (malformed LLM-judge answers, an endpoint without log-probs) says
    # so on every estimate it scored: a score it had to guess at is never a silent pass.
    judge_notes = tuple(plan.judge.warnings())
    if judge_notes:
        results = [replace(r, estimate=_with_warnings(r.estimate, judge_notes)) for r in results]
    return EstimationReport(engine.model_id, plan, results, engine.name)


def attach_adapter_warnings(engine: Engine, plan: EstimationPlan) -> list[str]:
    """Load the adapter of every LoRA component before any sampling, and make every estimate of
    the run record the warning of one trained on another checkpoint.

    The engine refuses an adapter trained on another architecture or tokenizer (InputError); one
    trained on another checkpoint of the same loads (its weights stay exact, since p is always
    scored under the current target) with a warning, which this adds to the component's note, so
    that `estimate_prompt` puts it in each estimate's warnings. Returns the warnings. Engines
    without adapter checks (`Engine.adapter_note`'s default) note nothing.
    """
    notes = []
    for i, comp in enumerate(plan.components):
        if comp.variant.adapter is None:
            continue
        note = engine.adapter_note(comp.variant.adapter)
        if note:
            notes.append(note)
            plan.components[i] = replace(comp, note="; ".join(n for n in (comp.note, note) if n))
    return notes


def estimate_role(engine, plan: EstimationPlan, prompts: Sequence[PromptItem], role: str,
                  progress: Callable[[int], None] | None = None) -> EstimationReport:
    """`run_estimation`, with any failure of the model or its engine that is not the user's named by role (exit 3)."""
    try:
        return run_estimation(engine, plan, prompts, progress=progress)
    except TailmonError:
        raise
    except Exception as exc:  # a model that loaded but fails in a forward pass, out of memory, ...
        raise RuntimeFailure(f"{role} estimation failed: {type(exc).__name__}: {exc}") from exc
