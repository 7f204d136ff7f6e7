"""Tuning proposal hyperparameters on a pilot batch (steering coefficient, temperature, LoRA scale,
mixture weights) by the estimated variance of the IS estimator.

**Candidates.** Each proposal is a template whose `{A|B|C}` groups list alternatives
(`temperature:{1.5|2|3}`, `steer:refusal.st@{2|4|8}@{8-12|14-18}`, `lora:adapter@{0.5|1}`); a
spec without a group is fixed. A candidate picks one alternative per template and a vector of
relative mixture weights from `weight_grid` (scale-free: (1, 2) and (2, 4) are one candidate);
the target keeps the fixed defensive share, since that share is what bounds every weight by
1/a0 (a safety setting, not an efficiency one).

**One pilot for every candidate.** Rather than sampling each candidate (their number is a
product), the pilot draws n samples per prompt from the *union* mixture U: the target with the
defensive share and every alternative of every template sharing the rest, each sample scored
under every component. A candidate c (components j with shares a_j, density q_c = sum_j a_j q_j)
would draw its n_j = a_j n samples stratified, and the variance of its estimate would be
    n Var(p_hat_c) = sum_j a_j Var_{q_j}(w_c h) = M2_c - sum_j a_j m1_cj^2,
    M2_c = E_{q_c}[(w_c h)^2],  m1_cj = E_{q_j}[w_c h],  w_c = p / q_c
(the formula the tests' exact design uses). With A = p h / q_U, both come from the union
samples by reweighting: M2_c = E_U[A w_c h], m1_cj = E_U[A q_j / q_c]. Every component of c is a
component of U with share at least (1 - a0) / (number of alternatives), so q_c / q_U is bounded
by that number and the reweighting is well behaved; every candidate is judged on the same
samples (common random numbers), which ranks them far more reliably than separate pilots of the
same total size.

**Objective.** `variance`: the sum over pilot prompts of n Var(p_hat_c), i.e. the variance of
the mean over prompts at equal samples per prompt (minimised). `ess`: the mean over prompts of
the expected ESS of w h per sample, P^2 / M2_c (maximised). Prompts on which no pilot sample was
harmful say nothing about any candidate (every estimate there is 0) and are left out, and said
so; if none had a harmful sample, tuning has nothing to go on and stops.

**Pilot samples never enter an estimate**: they are drawn with seeds of their own, and the
estimate that uses the tuned proposals draws afresh. Choosing the proposal from independent
pilot draws keeps that estimate unbiased (it is unbiased for every fixed choice).
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.special import logsumexp

from tailmon.engines.base import Engine, Variant
from tailmon.errors import InputError, SpecError

from .base import build_mixture
from .sampling import derive_seed, draw
from .spec import parse_proposal

OBJECTIVES = ("variance", "ess")
DEFAULT_WEIGHT_GRID = (1.0, 2.0, 4.0)
MAX_CANDIDATES = 10000
_GROUP = re.compile(r"\{([^{}]*\|[^{}]*)\}")
_TUNE = 5  # seed tag of the pilot draws


def expand_template(template: str) -> list[str]:
    """Every spec a template stands for: the product of its `{A|B}` groups, in order, distinct."""
    pieces = _GROUP.split(template)
    # split() alternates literal text and group contents
    choices = [[p] if i % 2 == 0 else p.split("|") for i, p in enumerate(pieces)]
    specs = list(dict.fromkeys("".join(combo) for combo in itertools.product(*choices)))
    for spec in specs:
        try:
            parse_proposal(spec)
        except SpecError as exc:
            raise SpecError(f"proposal template '{template}': {exc}") from None
    return specs


def parse_weight_grid(text: str | Sequence[float]) -> tuple[float, ...]:
    """`1,2,4` -> (1.0, 2.0, 4.0): the relative weights each proposal may take. A 0 lets the
    tuning leave a proposal out of the mixture (a candidate needs one proposal with weight > 0)."""
    values = text.split(",") if isinstance(text, str) else list(text)
    try:
        grid = tuple(float(v) for v in values)
    except ValueError:
        raise InputError(f"weight grid must be numbers separated by commas, got '{text}'", setting="weight_grid") from None
    if not grid or any(not (math.isfinite(v) and v >= 0) for v in grid) or max(grid) == 0:
        raise InputError(f"weight grid values must be >= 0, at least one > 0, got '{text}'", setting="weight_grid")
    return tuple(dict.fromkeys(grid))


@dataclass(frozen=True)
class Candidate:
    specs: tuple[str, ...]
    weights: tuple[float, ...]
    """Relative weights of the proposals in what the defensive share leaves."""

    def shares(self, defensive: float) -> list[float]:
        total = sum(self.weights)
        return [(1 - defensive) * w / total for w in self.weights]


def plan_candidates(templates: Sequence[str], weight_grid: Sequence[float] = DEFAULT_WEIGHT_GRID,
                    max_candidates: int = MAX_CANDIDATES) -> tuple[list[str], list[Candidate]]:
    """(the union's proposal specs, every candidate), checked before any model work."""
    if not templates:
        raise InputError("tuning needs at least one proposal template (e.g. 'temperature:{1.5|2|3}')",
                         setting="proposal")
    options = [expand_template(t) for t in templates]
    union = list(dict.fromkeys(s for opts in options for s in opts))
    k = len(templates)
    vectors: dict[tuple, tuple[float, ...]] = {}
    for vec in itertools.product(parse_weight_grid(weight_grid), repeat=k):
        if sum(vec) == 0:
            continue
        key = tuple(round(v / sum(vec), 12) for v in vec)
        vectors.setdefault(key, vec)  # (1, 1) stands for (2, 2) and (4, 4)
    count = math.prod(len(o) for o in options) * len(vectors)
    if count > max_candidates:
        raise InputError(f"{count} candidates is more than {max_candidates}: fewer alternatives or weight-grid values")
    candidates = []
    for specs in itertools.product(*options):
        if len(set(specs)) < len(specs):
            continue  # the same component twice is another weighting of a smaller mixture
        for vec in vectors.values():
            # a proposal weighted 0 is not in the mixture at all: drawing none of it and scoring
            # under it would still cost a pass and change no weight
            kept = [(s, w) for s, w in zip(specs, vec) if w > 0]
            weights = tuple(w for _, w in kept) if len(kept) > 1 else (1.0,)
            candidates.append(Candidate(tuple(s for s, _ in kept), weights))
    candidates = list(dict.fromkeys(candidates))  # (a, b) at (1, 0) and (a, c) at (1, 0) are both (a,)
    if not candidates:
        raise InputError("the proposal templates give no candidate with distinct components")
    return union, candidates


def candidate_moments(logq: np.ndarray, union_shares: np.ndarray, scores: np.ndarray, cols: Sequence[int],
                      alphas: Sequence[float], mass: np.ndarray | None = None) -> tuple[float, float, np.ndarray]:
    """(P, M2_c, m1_cj) of one candidate (components `cols` of the union with shares `alphas`) from
    samples of the union mixture: means over the samples, or with `mass` the exact expectation
    sum_y mass(y) f(y) (mass = q_U over an enumerated support)."""
    alphas = np.asarray(alphas, dtype=float)
    used = union_shares > 0
    log_qu = logsumexp(logq[:, used] + np.log(union_shares[used]), axis=1)
    on = alphas > 0
    cols = np.asarray(cols)
    log_qc = logsumexp(logq[:, cols[on]] + np.log(alphas[on]), axis=1)
    hit = scores > 0
    log_p = logq[:, 0]
    a = np.zeros(len(scores))  # A = p h / q_U
    a[hit] = np.exp(log_p[hit] - log_qu[hit]) * scores[hit]
    wh = np.zeros(len(scores))  # w_c h
    wh[hit] = np.exp(log_p[hit] - log_qc[hit]) * scores[hit]
    # q_j / q_c <= 1 / a_j for the components with a share; the others get no share of the
    # stratification and need no ratio (it could overflow)
    ratio = np.zeros((len(scores), len(cols)))
    ratio[:, on] = np.exp(logq[:, cols[on]] - log_qc[:, None])
    if mass is None:
        mean = lambda f: float(np.mean(f, axis=0)) if f.ndim == 1 else np.mean(f, axis=0)  # noqa: E731
    else:
        mean = lambda f: float(mass @ f) if f.ndim == 1 else mass @ f  # noqa: E731
    return mean(a), mean(a * wh), mean(a[:, None] * ratio)


def stratified_variance(m2: float, m1: np.ndarray, alphas: Sequence[float]) -> float:
    """n Var(p_hat) of the stratified estimator: M2 - sum_j a_j m1_j^2 (never below 0)."""
    return max(0.0, m2 - float(np.dot(np.asarray(alphas, dtype=float), m1 ** 2)))


@dataclass
class TuneResult:
    objective: str
    defensive: float
    best: Candidate
    ranking: list[dict]
    """Every candidate, best first: specs, weights, per_sample_variance, ess_per_sample, relative."""
    prompts: list[str]
    informative: int
    """Pilot prompts with at least one harmful sample (the others inform no choice)."""
    samples: int
    seed: int
    union: list[str]
    pilot: list[dict] = field(default_factory=list)
    """Per pilot prompt: its union estimate of P and how many pilot samples were harmful."""

    def proposal_specs(self) -> list[str]:
        return list(self.best.specs)

    def config_snippet(self) -> str:
        """YAML a monitor config takes as its `proposals:` list (with the defensive share noted)."""
        import yaml

        best = self.ranking[0]
        entries = [{"spec": s, "weight": _number(w)} for s, w in zip(self.best.specs, self.best.weights)]
        head = [
            f"# tuned by tailmon proposals tune: {len(self.prompts)} pilot prompts x {self.samples} samples "
            f"(seed {self.seed}), objective {self.objective}, best of {len(self.ranking)} candidates",
            f"# estimated per-sample variance {best['per_sample_variance']:.4g}, "
            f"ESS of w*h per sample {best['ess_per_sample']:.4g}; tuned with estimator.defensive: {self.defensive:g}",
        ]
        return "\n".join(head) + "\n" + yaml.safe_dump({"proposals": entries}, sort_keys=False, allow_unicode=True,
                                                       width=1000)

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "defensive": self.defensive,
            "proposals": [{"spec": s, "weight": _number(w)} for s, w in zip(self.best.specs, self.best.weights)],
            "prompts": list(self.prompts),
            "informative_prompts": self.informative,
            "samples_per_prompt": self.samples,
            "seed": self.seed,
            "union": list(self.union),
            "pilot": self.pilot,
            "candidates": self.ranking,
        }


def _number(w: float):
    return int(w) if float(w).is_integer() else float(w)


def tune(engine: Engine, target: Variant, judge, prompts: Sequence[str], templates: Sequence[str], *,
         defensive: float = 0.1, samples: int = 200, seed: int = 0, objective: str = "variance",
         weight_grid: Sequence[float] | str = DEFAULT_WEIGHT_GRID, progress: bool = False) -> TuneResult:
    """Pick the candidate with the smallest estimated variance (or largest ESS of w h) on a pilot."""
    from tqdm import tqdm

    if objective not in OBJECTIVES:
        raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}, got '{objective}'", setting="objective")
    if int(samples) != samples or samples < 2:
        raise InputError(f"samples must be an integer >= 2 (pilot samples per prompt), got {samples}", setting="samples")
    if not prompts:
        raise InputError("tuning needs pilot prompts")
    union, candidates = plan_candidates(templates, weight_grid)
    components = build_mixture(target, [parse_proposal(s) for s in union], defensive)
    variants = [c.variant for c in components]
    shares = [c.share for c in components]
    index = {s: i + 1 for i, s in enumerate(union)}

    draws = []
    with tqdm(total=len(prompts) * samples, desc="pilot", unit="sample", file=sys.stderr, disable=not progress) as bar:
        for x in prompts:
            draws.append(draw(engine, x, variants, shares, samples, lambda j, x=x: derive_seed(seed, _TUNE, x, j),
                              judge, bar.update))
    informative = [d for d in draws if np.any(d.scores > 0)]
    if not informative:
        raise InputError(f"no pilot sample was harmful on any of the {len(prompts)} prompts under judge "
                         f"'{getattr(judge, 'spec', judge)}': tuning has nothing to go on (more samples or "
                         "stronger proposals)")
    pilot_info = []
    for d in draws:
        p_hat, _, _ = candidate_moments(d.logq, d.shares, d.scores, [0], [1.0])
        pilot_info.append({"prompt": d.prompt, "p_hat": p_hat, "n_harmful": int(np.count_nonzero(d.scores > 0))})

    rows = []
    for cand in candidates:
        cols = [0] + [index[s] for s in cand.specs]
        alphas = [defensive] + cand.shares(defensive)
        var_sum, ess = 0.0, []
        for d in informative:
            p, m2, m1 = candidate_moments(d.logq, d.shares, d.scores, cols, alphas)
            var_sum += stratified_variance(m2, m1, alphas)
            ess.append(p * p / m2 if m2 > 0 else 0.0)
        m = len(informative)
        rows.append({"specs": list(cand.specs), "weights": [_number(w) for w in cand.weights],
                     "per_sample_variance": var_sum / m ** 2, "ess_per_sample": float(np.mean(ess)),
                     "_candidate": cand})
    if objective == "variance":
        rows.sort(key=lambda r: (r["per_sample_variance"], -r["ess_per_sample"]))
        best_value = rows[0]["per_sample_variance"]
        for r in rows:
            r["relative"] = r["per_sample_variance"] / best_value if best_value > 0 else None
    else:
        rows.sort(key=lambda r: (-r["ess_per_sample"], r["per_sample_variance"]))
        best_value = rows[0]["ess_per_sample"]
        for r in rows:
            r["relative"] = r["ess_per_sample"] / best_value if best_value > 0 else None
    best = rows[0]["_candidate"]
    for r in rows:
        del r["_candidate"]
    return TuneResult(objective, float(defensive), best, rows, list(prompts), len(informative), int(samples),
                      int(seed), union, pilot_info)
