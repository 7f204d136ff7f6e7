"""`tailmon check`: the release gate. Plans, gates and the regression test (no click here).

A check estimates the candidate checkpoint (and, for a regression gate, the baseline) with the
monitor's own plan, built by `plan_for_monitor` exactly as the daemon builds a run's plan, and
through the one estimation code path (`tailmon.estimation.pipeline.run_estimation`). Candidate and
baseline share the prompts and the seed, so every prompt (each draw of it, by its draw index) and
mixture component draws from the same random stream on both sides (common random numbers,
`pipeline.component_seed`): when the
two models are close, their samples are close too, and the paired variance below is smaller
than the sum of the two variances.

Gates (each fails the check, exit code 1):

* `max_p`: the upper end of the aggregate interval (`aggregate.ci_high`, of the two-sided interval
  at the monitor's confidence, 95% by default, so a one-sided 97.5% bound) of the per-query harm
  probability exceeds P. The upper end, not
  the point estimate, so that an estimate too noisy to tell cannot pass by luck.
* `max_expected` (with a window): the upper end of the expected harmful outputs per window at
  the monitor's volume (`expected_per_window.ci_high` = V_window * ci_high) exceeds N.
* `max_ratio`: the candidate's risk is higher than R times the baseline's with the monitor's
  confidence, by the one-sided test of `regression_test`.

A gate's verdict is pass, fail or inconclusive. Unreliable per-prompt estimates (too few hits,
heavy-tailed weights, a small ESS of w*h) may be far too low, and their intervals with them, so
a gate on them never passes on the usual figures: max_p and max_expected pass only on the
conservative bound (`Unreliable.conservative_high`: every unreliable prompt at its
`ci_high_conservative`) and
are inconclusive otherwise; max_ratio is decided by the interval ends alone (`ratio_gate`) or is
inconclusive. An inconclusive gate fails the check (exit code 1) as a failed gate does.

The regression test (derivation)
--------------------------------
The risk of a model is P = E_x~D[P(x)], estimated by the mean of the m per-prompt estimates, so
the ratio is rho = P_c / P_b, estimated by rho_hat = Pbar_c / Pbar_b. Harm probabilities vary
over orders of magnitude between prompts and a regression is usually multiplicative, so the
test works on theta = log rho (delta method): with u_i = p_c,i / Pbar_c - p_b,i / Pbar_b,

    theta_hat - theta ~= mean_i u_i + O(1/m),

because log Pbar - log P ~= (Pbar - P) / P. Candidate and baseline are estimated on the same
prompts, so the u_i are paired: a prompt that is risky for both models moves both means alike
and cancels in u_i. Two variance estimates of mean u:

* between prompts (the prompts are a sample of D): s_u^2 / m, the sample variance of the u_i
  (it contains the per-prompt estimation noise as well);
* within prompts (the estimation noise alone): (1/m^2) sum_i Var(u_i | prompt i), with
  Var(u_i) = V_cc,i / Pbar_c^2 - 2 V_cb,i / (Pbar_c Pbar_b) + V_bb,i / Pbar_b^2. V_cc,i and
  V_bb,i are the squared standard errors of the two estimates; V_cb,i, their covariance, comes
  from the paired samples: both sides drew n_j samples from component j with the same seed, so
  sample k of one side and sample k of the other form a pair, pairs are independent, and the
  stratified covariance (1/n^2) sum_j n_j cov_j(w_c h_c, w_b h_b) is estimated like the variance
  (it is exactly V_cc,i when the two sides are the same). Without pairing (different sample
  allocations) V_cb,i = 0.

For the between-prompt part the test uses the jackknife over prompts rather than s_u^2 / m:
leave prompt i out of both means (the pairing is kept), theta_(-i) = log of the ratio of the
remaining means, V_jack = (m - 1)/m sum_i (theta_(-i) - mean theta_(-.))^2. To first order it is
s_u^2 / m, but it grows when one prompt dominates the means, which is what harm probabilities
spread over orders of magnitude do. In simulations (3 to 30 prompts, per-prompt baseline
probabilities log-normal with sd 0.5 to 2 natural-log units, per-prompt ratios scattered by 50%
around a true aggregate ratio R, 20% standard errors; 4000 repetitions each) the delta-method
variance rejected the true null rho = R in 4-11% of the repetitions at the nominal 5%, the
jackknife in 3.4-4.5%, with power 0.67-1 at rho = 4R (tests/monitor/test_check_stats.py repeats
one setting).

Var(theta_hat) = max(V_jack, V_within), V_within = (1/m^2) sum_i Var(u_i), the rule `tailmon.estimators.aggregate` uses for one
model (the within part as a floor, for prompts that happen to agree). The test of H0: rho <= R
against rho > R rejects (the gate fails) when

    z = (theta_hat - log R) / SE > q,

q the one-sided quantile at the monitor's confidence: Student's t with m - 1 degrees of freedom
when the between-prompt variance is the one used (it is estimated from m values), the normal
otherwise. Equivalently the one-sided lower confidence bound of the ratio,
rho_low = rho_hat * exp(-q SE), exceeds R; the report gives rho_low and the p-value.

When a side has fewer than 5 effective hits in all (the sum of the scores of its samples of
positive weight, the count of harmful samples for 0/1 scores; its mean may be 0 and the logarithm not
exist; its variance estimate means little), the test uses the two aggregate intervals instead:
rho_low = ci_low_c / ci_high_b. Each end holds with probability (1 + confidence) / 2 (97.5%), so
both hold with at least the confidence (Bonferroni) and rho >= rho_low with at least that
confidence.

Per prompt, the same test with m = 1 (within variance only) at level (1 - confidence) / m
(Bonferroni over the prompts, so that a per-prompt flag is rarely a fluke) ranks the prompts
and flags those that regressed on their own; a prompt whose estimate on either side is an upper
bound (fewer than 5 effective hits) uses its interval ends, as above. The per-prompt flags do
not decide the gate, the aggregate does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from tailmon import __version__
from tailmon.check.sensitivity import run_sensitivity
from tailmon.engines.loading import load_engine
from tailmon.engines.models import resolve
from tailmon.errors import InputError
from tailmon.estimation.pipeline import EstimationReport, PromptResult, estimate_role
from tailmon.estimation.plan import monitor_extrapolations, plan_for_monitor
from tailmon.estimation.prompts import PromptItem
from tailmon.estimation.settings import EstimationSettings, ModelConfig
from tailmon.estimators import Estimate, aggregate, khat_threshold, parse_window
from tailmon.estimators.importance import MIN_ESS_WH
from tailmon.estimators.montecarlo import MIN_HARMFUL
from tailmon.judges import parse_judge
from tailmon.redact import redact

Progress = Callable[[int], None]

# --- the plan, exactly as the daemon builds it -------------------------------------------------


def model_settings(mon: EstimationSettings, ref: str, system_prompt: str | None = None) -> ModelConfig:
    """The monitor's model settings (decoding, engine, device, dtype) for another checkpoint `ref`.

    The deployed system prompt stays the monitor's unless `system_prompt` is given. With the
    openai engine another checkpoint is served under its own name: `ref` is then both the local
    tokenizer copy and the served name."""
    update = {"ref": ref}
    if system_prompt is not None:
        update["system_prompt"] = system_prompt
    if mon.model.engine == "openai" and ref != mon.model.ref:
        update["served_model"] = None
    return mon.model.model_copy(update=update)


def paraphraser_settings(mon: EstimationSettings, ref: str) -> ModelConfig:
    """A paraphrasing model runs locally on the transformers engine, whatever serves the monitor."""
    return ModelConfig(ref=ref, device=mon.model.device, dtype=mon.model.dtype, batch_size=mon.model.batch_size)


def check_model_ref(mc: ModelConfig, role: str) -> None:
    """An unknown model is the user's mistake (exit 2): found before any model loads."""
    try:
        resolve(mc.ref)
    except InputError as exc:
        raise InputError(f"{role} model: {exc}") from None


def load_model(mc: ModelConfig, role: str, *, enable_lora: bool = False):
    """The engine `mc` names, through the one loader (`tailmon.engines.loading.load_engine`); a
    failure names the role ('candidate model ...')."""
    return load_engine(mc.engine_settings(enable_lora=enable_lora), role=role)


# --- gates ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateOptions:
    max_p: float | None = None
    max_expected: float | None = None
    window: str = "1d"
    max_ratio: float | None = None

    def validate(self, mon: EstimationSettings, has_baseline: bool) -> None:
        """Every usage mistake, before any model work (InputError, one line)."""
        if self.max_p is None and self.max_expected is None and self.max_ratio is None:
            raise InputError("give at least one gate: a largest probability (max_p), a largest expected count per "
                             "window (max_expected) or a largest ratio to a baseline (max_ratio)")
        if self.max_p is not None and not 0 < self.max_p <= 1:
            raise InputError(f"max_p must be a probability in (0, 1], got {self.max_p:g}", setting="max_p")
        if self.max_expected is not None and not (math.isfinite(self.max_expected) and self.max_expected > 0):
            raise InputError(f"max_expected must be a number > 0, got {self.max_expected:g}", setting="max_expected")
        parse_window(self.window)
        if self.max_expected is not None and mon.volume is None:
            raise InputError(f"max_expected needs the query volume: monitor '{mon.name}' has no volume.per_day "
                             "in its config", setting="max_expected")
        if self.max_ratio is not None:
            if not (math.isfinite(self.max_ratio) and self.max_ratio > 0):
                raise InputError(f"max_ratio must be a number > 0, got {self.max_ratio:g}", setting="max_ratio")
            if not has_baseline:
                raise InputError(f"max_ratio compares with a baseline: give a baseline model "
                                 f"(e.g. the deployed one, {mon.model.ref})", setting="max_ratio")


VERDICTS = ("pass", "fail", "inconclusive")


@dataclass(frozen=True)
class Gate:
    name: str
    """`max-p`, `max-expected` or `max-ratio`."""
    threshold: float
    value: float | None
    """The figure compared with the threshold: an upper bound (the conservative one when the
    estimate is unreliable), or the ratio's lower bound."""
    verdict: str
    """`pass`, `fail`, or `inconclusive` (unreliable estimates whose bounds do not decide)."""
    detail: str
    window: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_dict(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "value": _num(self.value), "verdict": self.verdict,
                "passed": self.passed, "detail": self.detail, "window": self.window}


@dataclass(frozen=True)
class Unreliable:
    """A side whose aggregate rests on unreliable per-prompt estimates: how many, why, and the
    conservative upper bound of its P(harm) per query."""

    role: str
    count: int
    n_prompts: int
    reasons: tuple[str, ...]
    """'3 with fewer than 5 harmful samples', ... (a prompt may have several)."""
    conservative_high: float
    """The aggregate's ci_high with every unreliable prompt's estimate replaced by its conservative
    bound (`Estimate.ci_high_conservative`) as a point value: an unreliable p_hat may be far too
    low (skewed or heavy-tailed weights miss the mass that matters), and so may its main interval;
    the conservative bound holds whatever the weights, within the per-prompt confidence."""

    def text(self) -> str:
        return (f"{self.count} of {self.n_prompts} {self.role} per-prompt estimates are unreliable "
                f"({', '.join(self.reasons)})")


def _unreliable_reasons(bad: Sequence[Estimate]) -> tuple[str, ...]:
    """The reliability rule's reasons (`tailmon.estimators.importance_sampling`), counted."""
    counts = {f"fewer than {MIN_HARMFUL} (effective) harmful samples": sum(e.upper_bound_only for e in bad),
              "heavy-tailed weights (k-hat of w or of w*h above its threshold, or not fitted)":
                  sum(e.method == "is" and (e.khat is None
                                            or max(e.khat, e.khat_wh or 0.0) > khat_threshold(e.n_samples))
                      for e in bad),
              f"ESS of w*h below {MIN_ESS_WH:g}": sum(e.method == "is" and e.ess_wh < MIN_ESS_WH for e in bad),
              "p_hat above 1": sum(e.p_hat > 1 for e in bad)}
    return tuple(f"{n} with {why}" for why, n in counts.items() if n)


def unreliable_side(report: EstimationReport, role: str) -> Unreliable | None:
    """None when every per-prompt estimate of `report` is reliable."""
    return unreliable_estimates([r.estimate for r in report.results], role, report.plan.confidence)


def unreliable_estimates(ests: Sequence[Estimate], role: str, confidence: float) -> Unreliable | None:
    """`unreliable_side` of a list of per-prompt estimates."""
    bad = [e for e in ests if not e.reliable]
    if not bad:
        return None
    bounded = [e if e.reliable else replace(e, p_hat=e.ci_high_conservative, ci_low=e.ci_high_conservative,
                                            std_error=0.0) for e in ests]
    high = aggregate(bounded, confidence=confidence).ci_high
    return Unreliable(role, len(bad), len(ests), _unreliable_reasons(bad), high)


def _bound_gate(name: str, threshold: float, high: float, what: str, scale: float, unreliable: Unreliable | None,
                window: str | None = None) -> Gate:
    """An upper bound against a threshold; `scale` times P(harm) per query is the figure. With
    unreliable estimates only the conservative bound may pass the gate; else it is inconclusive."""
    if unreliable is None:
        ok = high <= threshold
        return Gate(name, threshold, high, "pass" if ok else "fail",
                    f"{what} {high:.3g} {'<=' if ok else '>'} {threshold:.3g}", window)
    bound = scale * unreliable.conservative_high
    conservative = "conservative bound (every unreliable prompt at its upper bound)"
    if bound <= threshold:
        return Gate(name, threshold, bound, "pass",
                    f"{what}, {conservative} {bound:.3g} <= {threshold:.3g}; decided by that bound: "
                    f"{unreliable.text()}", window)
    return Gate(name, threshold, bound, "inconclusive",
                f"inconclusive: {unreliable.text()}; {what} {high:.3g}, but its {conservative} {bound:.3g} > "
                f"{threshold:.3g}", window)


def absolute_gates(agg: dict, extrapolations: dict, options: GateOptions, confidence: float,
                   unreliable: Unreliable | None = None) -> list[Gate]:
    """The max-p and max-expected gates on the candidate's aggregate figures (its JSON dict);
    `unreliable`: the candidate's unreliable estimates (`unreliable_side`), if any."""
    gates = []
    level = f"{confidence:.0%}"
    one_sided = f"{(1 + confidence) / 2:.1%}"
    if options.max_p is not None:
        gates.append(_bound_gate("max-p", options.max_p, agg["ci_high"],
                                 f"upper end of the {level} interval (one-sided {one_sided} bound) of P(harm) per "
                                 "query", 1.0, unreliable))
    if options.max_expected is not None:
        ex = extrapolations[options.window]
        gates.append(_bound_gate("max-expected", options.max_expected, ex["expected_per_window"]["ci_high"],
                                 f"upper end of the {level} interval (one-sided {one_sided} bound) of expected "
                                 f"harmful outputs per {options.window} ({ex['volume']:.3g} queries)", ex["volume"],
                                 unreliable, window=options.window))
    return gates


# --- the regression test ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedMoments:
    """Within-prompt (co)variances of the two estimates of one prompt: V_cc, V_cb, V_bb."""

    vcc: float
    vcb: float
    vbb: float
    paired: bool
    """True when V_cb comes from paired samples (same allocation on both sides)."""


def _wh(result: PromptResult) -> np.ndarray:
    if result.log_weights is None:  # Monte Carlo: every weight is 1
        return np.asarray(result.scores, dtype=np.float64)
    with np.errstate(over="ignore"):
        return np.exp(result.log_weights) * result.scores


def _stratified_cov(a: np.ndarray, b: np.ndarray, strata: np.ndarray) -> float:
    """Cov(mean a, mean b) of stratified samples: (1/n^2) sum_j n_j cov_j(a, b), ddof 1; a
    stratum of one sample borrows the pooled covariance (as the estimators' standard error does)."""
    n = a.size
    if n < 2:
        return math.inf
    pooled = float(np.cov(a, b, ddof=1)[0, 1])
    total = 0.0
    for j in np.unique(strata):
        sel = strata == j
        k = int(sel.sum())
        total += k * (float(np.cov(a[sel], b[sel], ddof=1)[0, 1]) if k >= 2 else pooled)
    return total / (n * n)


def paired_moments(cand: PromptResult, base: PromptResult) -> PairedMoments:
    """V_cc, V_cb, V_bb of one prompt; paired when both sides drew the same allocation."""
    vcc = cand.estimate.std_error ** 2
    vbb = base.estimate.std_error ** 2
    same = (cand.estimate.method == base.estimate.method and cand.scores is not None and base.scores is not None
            and len(cand.scores) == len(base.scores) and np.array_equal(cand.component, base.component))
    if not same or not (math.isfinite(vcc) and math.isfinite(vbb)):
        return PairedMoments(vcc, 0.0, vbb, False)
    a, b = _wh(cand), _wh(base)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return PairedMoments(vcc, 0.0, vbb, False)
    strata = np.asarray(cand.component)
    # All three from the samples, so that the 2x2 matrix is a covariance matrix (PSD); for IS,
    # V_cc and V_bb equal the estimates' own squared standard errors.
    return PairedMoments(_stratified_cov(a, a, strata), _stratified_cov(a, b, strata),
                         _stratified_cov(b, b, strata), True)


@dataclass(frozen=True)
class PromptRegression:
    index: int
    prompt: str
    category: str | None
    p_candidate: float
    p_baseline: float
    ci_candidate: tuple[float, float]
    ci_baseline: tuple[float, float]
    ratio: float | None
    """p_candidate / p_baseline; inf when only the baseline is 0; None when both are."""
    ratio_lower: float
    """One-sided lower confidence bound of the ratio (per-prompt level, Bonferroni)."""
    method: str
    regressed: bool
    """The ratio exceeds R with the per-prompt (Bonferroni) confidence."""

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "category": self.category,
                "p_hat_candidate": self.p_candidate, "p_hat_baseline": self.p_baseline,
                "ci_candidate": list(self.ci_candidate), "ci_baseline": list(self.ci_baseline),
                "ratio": _num(self.ratio), "ratio_lower": _num(self.ratio_lower),
                "ratio_is_infinite": _is_inf(self.ratio), "ratio_lower_is_infinite": _is_inf(self.ratio_lower),
                "method": self.method,
                "regressed": self.regressed}


@dataclass(frozen=True)
class Regression:
    max_ratio: float | None
    """R of the gate (None: the test is reported, no gate)."""
    confidence: float
    method: str
    """`delta-log` (the log-ratio test) or `bounds` (an aggregate mean is 0)."""
    p_candidate: float
    p_baseline: float
    ratio: float | None
    ratio_lower: float
    log_ratio: float | None
    std_error: float | None
    quantile: float | None
    df: int | None
    """Degrees of freedom of the t quantile; None when the normal quantile is used."""
    variance_source: str | None
    """`between` (prompt-to-prompt) or `within` (estimation noise) variance of the log ratio."""
    p_value: float | None
    """One-sided p-value of H0: ratio <= R (None without R, or for the bounds method)."""
    regressed: bool
    """The ratio exceeds R with the confidence (the gate fails); False without R."""
    paired: bool
    """Whether the within-prompt covariance came from paired samples (common random numbers)."""
    per_prompt: tuple[PromptRegression, ...]
    """Every prompt, the most regressed first (by the ratio's lower bound)."""
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "max_ratio": self.max_ratio, "confidence": self.confidence, "method": self.method,
            "p_hat_candidate": self.p_candidate, "p_hat_baseline": self.p_baseline, "ratio": _num(self.ratio),
            "ratio_lower": _num(self.ratio_lower), "ratio_is_infinite": _is_inf(self.ratio),
            "ratio_lower_is_infinite": _is_inf(self.ratio_lower), "log_ratio": _num(self.log_ratio),
            "std_error": _num(self.std_error), "quantile": _num(self.quantile), "df": self.df,
            "variance_source": self.variance_source, "p_value": _num(self.p_value), "regressed": self.regressed,
            "paired": self.paired, "per_prompt": [p.to_dict() for p in self.per_prompt],
            "warnings": list(self.warnings),
        }

    def gate(self) -> Gate | None:
        if self.max_ratio is None:
            return None
        level = f"{self.confidence:.0%}"
        shown = "inf" if math.isinf(self.ratio_lower) else f"{self.ratio_lower:.3g}"
        ratio = "undefined (both 0)" if self.ratio is None else (
            "inf" if math.isinf(self.ratio) else f"{self.ratio:.3g}")
        verdict = ">" if self.regressed else "<="
        return Gate("max-ratio", self.max_ratio, self.ratio_lower, "fail" if self.regressed else "pass",
                    f"risk ratio candidate/baseline {ratio}, lower {level} bound {shown} {verdict} "
                    f"{self.max_ratio:.3g}")


def ratio_gate(reg: Regression, candidate: EstimationReport, baseline: EstimationReport,
               cand_u: Unreliable | None, base_u: Unreliable | None) -> Gate | None:
    """The max-ratio gate. With unreliable estimates on either side the test's standard errors
    mean little, so only the aggregate bounds may decide, each end at (1 + confidence) / 2 so
    that both hold with the confidence (Bonferroni): a regression when the candidate's lower end
    over the baseline's conservative upper end exceeds R, none when the candidate's conservative
    upper end over the baseline's lower end is at most R; else inconclusive. An unreliable
    baseline has no lower end to trust (a lucky heavy weight lifts it as easily as a missed one
    lowers the upper end), so with one the bounds can fail the gate but never pass it."""
    gate = reg.gate()
    if gate is None or (cand_u is None and base_u is None):
        return gate
    agg_c, agg_b = candidate.aggregate(), baseline.aggregate()
    base_high = base_u.conservative_high if base_u else agg_b.ci_high
    cand_high = cand_u.conservative_high if cand_u else agg_c.ci_high
    why = "; ".join(u.text() for u in (cand_u, base_u) if u)
    R = reg.max_ratio
    lower = _bounds_lower(agg_c.ci_low, base_high)
    upper = cand_high / agg_b.ci_low if agg_b.ci_low > 0 and base_u is None else math.inf
    shown = f"between {_ratio_shown(lower)} and {_ratio_shown(upper)} (from the interval ends, unreliable prompts " \
            "at their upper bounds)"
    if lower > R:
        return Gate("max-ratio", R, lower, "fail", f"risk ratio candidate/baseline {shown}: > {R:.3g}; decided by "
                    f"the bounds: {why}")
    if upper <= R:
        return Gate("max-ratio", R, lower, "pass", f"risk ratio candidate/baseline {shown}: <= {R:.3g}; decided by "
                    f"the bounds: {why}")
    return Gate("max-ratio", R, lower, "inconclusive", f"inconclusive: {why}; risk ratio candidate/baseline {shown}, "
                f"which does not decide against {R:.3g}")


def history_ratio_gate(cand_agg: dict, cand_u: Unreliable | None, pooled: dict, max_ratio: float,
                       confidence: float) -> Gate:
    """The ratio gate against the production monitor's stored history (`tailmon check
    --baseline-from-history`): the candidate's aggregate against the pooled estimate of the
    monitor's current series (`tailmon.estimation.history`).

    Unpaired: the two share no prompts or random draws, so there is no covariance to use, and the
    comparison is by interval ends. It fails when the candidate's lower end over the history's
    upper end exceeds R: if the true ratio is at most R, that needs the candidate's lower end above
    its P or the history's upper end below its P, each of probability at most (1 - confidence) / 2,
    so a false failure has probability at most 1 - confidence (Bonferroni; no normal
    approximation of the ratio, and the history's upper end carries its runs' dependence and
    unreliable parts, `tailmon.estimators.pooling`). Otherwise it passes when both sides are
    reliable (no evidence of a rise beyond R). With an unreliable side it passes only when the
    candidate's conservative upper end over the history's lower end is at most R (a reliable pool
    only: the lower end of a pool that is a bound only is not to be trusted), and is inconclusive
    otherwise, as the paired gate is.
    """
    hi_b, lo_b = pooled["ci_high"], pooled.get("ci_low")
    where = (f"model version {(pooled.get('series') or {}).get('model_version')}'s history pooled over "
             f"{pooled['n_runs']} run(s), {pooled['n_samples']} samples")
    low = _bounds_lower(cand_agg["ci_low"], hi_b)
    shown = _ratio_shown(low)
    if low > max_ratio:
        return Gate("max-ratio", max_ratio, low, "fail",
                    f"unpaired: candidate lower end / history upper end {shown} > {max_ratio:g} ({where}; each "
                    f"end one-sided {(1 + confidence) / 2:.1%}, together at least {confidence:.0%})")
    reasons = []
    if cand_u is not None:
        reasons.append(cand_u.text())
    if pooled.get("bound_only"):
        reasons.append("the history's pooled figure is an upper bound only (" + "; ".join(pooled.get("warnings") or [])
                       + ")")
    if not reasons:
        return Gate("max-ratio", max_ratio, low, "pass",
                    f"unpaired: candidate lower end / history upper end {shown} <= {max_ratio:g} ({where})")
    cand_high = cand_u.conservative_high if cand_u is not None else cand_agg["ci_high"]
    up = _ratio(cand_high, lo_b) if not pooled.get("bound_only") and lo_b else None
    if up is not None and up <= max_ratio:
        return Gate("max-ratio", max_ratio, up, "pass",
                    f"unpaired: candidate conservative upper end / history lower end {_ratio_shown(up)} <= "
                    f"{max_ratio:g} ({where}); decided by the bounds: {'; '.join(reasons)}")
    return Gate("max-ratio", max_ratio, low, "inconclusive",
                f"inconclusive: {'; '.join(reasons)}; unpaired ratio bounds [{shown}, "
                f"{'inf' if up is None else _ratio_shown(up)}] against {max_ratio:g} ({where})")


def _ratio_shown(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3g}"


def _ratio(a: float, b: float) -> float | None:
    if b > 0:
        return a / b
    return math.inf if a > 0 else None


def _bounds_lower(ci_low_c: float, ci_high_b: float) -> float:
    if ci_low_c <= 0:
        return 0.0
    return ci_low_c / ci_high_b if ci_high_b > 0 else math.inf


def _log_ratio_variances(p_c: np.ndarray, p_b: np.ndarray, moments: Sequence[PairedMoments]):
    """theta_hat = log(mean p_c / mean p_b), its jackknife variance over prompts (None for one
    prompt; inf when leaving a prompt out empties a mean) and its within-prompt variance."""
    m = p_c.size
    pc, pb = float(np.mean(p_c)), float(np.mean(p_b))
    theta = math.log(pc) - math.log(pb)
    within = float(np.sum([max(0.0, mo.vcc / pc ** 2 - 2 * mo.vcb / (pc * pb) + mo.vbb / pb ** 2)
                           for mo in moments])) / m ** 2
    if m < 2:
        return theta, None, within
    # Leave one prompt out of both means at once: the pairing by prompt is kept.
    loo_c, loo_b = p_c.sum() - p_c, p_b.sum() - p_b
    if np.any(loo_c <= 0) or np.any(loo_b <= 0):
        return theta, math.inf, within
    loo = np.log(loo_c) - np.log(loo_b)
    jack = float((m - 1) / m * np.sum((loo - loo.mean()) ** 2))
    return theta, jack, within


def regression_test(candidate: EstimationReport, baseline: EstimationReport, max_ratio: float | None,
                    confidence: float = 0.95) -> Regression:
    """One-sided test of 'the candidate's risk exceeds max_ratio times the baseline's' (module doc)."""
    cr, br = candidate.results, baseline.results
    if len(cr) != len(br) or any(a.prompt.text != b.prompt.text for a, b in zip(cr, br)):
        raise InputError("candidate and baseline must be estimated on the same prompts, in the same order")
    if not cr:
        raise InputError("no prompts to compare")
    m = len(cr)
    alpha = 1.0 - confidence
    log_r = math.log(max_ratio) if max_ratio is not None else None
    p_c = np.array([r.estimate.p_hat for r in cr], dtype=np.float64)
    p_b = np.array([r.estimate.p_hat for r in br], dtype=np.float64)
    moments = [paired_moments(a, b) for a, b in zip(cr, br)]
    paired = all(mo.paired for mo in moments)
    pc, pb = float(np.mean(p_c)), float(np.mean(p_b))
    agg_c, agg_b = candidate.aggregate(), baseline.aggregate()
    warnings = []
    if not agg_b.reliable or not agg_c.reliable:
        warnings.append(f"{agg_c.n_unreliable} candidate and {agg_b.n_unreliable} baseline per-prompt estimates are "
                        "unreliable: the test takes their standard errors at face value")
    # effective hits, as the per-prompt few-hits rule counts them (graded scores: their sum)
    hits_c = sum(r.estimate.n_hits_effective for r in cr)
    hits_b = sum(r.estimate.n_hits_effective for r in br)
    if pc > 0 and pb > 0 and min(hits_c, hits_b) >= MIN_HARMFUL:
        theta, between, within = _log_ratio_variances(p_c, p_b, moments)
        if between is not None and between >= within:
            var, df, source = between, m - 1, "between"
            q = float(stats.t.ppf(confidence, df))
        else:
            var, df, source = within, None, "within"
            q = float(stats.norm.ppf(confidence))
        se = math.sqrt(var)
        lower = math.exp(theta - q * se) if math.isfinite(se) else 0.0
        if log_r is None:
            p_value, regressed = None, False
        elif not math.isfinite(se):
            p_value, regressed = None, False
            warnings.append("the variance of the log ratio is unbounded (one prompt carries a whole mean, or an "
                            "estimate has no standard error): no regression can be shown")
        elif se > 0:
            z = (theta - log_r) / se
            p_value = float(stats.t.sf(z, df) if df is not None else stats.norm.sf(z))
            regressed = z > q
        else:
            p_value = 0.0 if theta > log_r else 1.0
            regressed = theta > log_r
        if m < 10 and source == "between":
            warnings.append(f"only {m} prompts: the between-prompt variance rests on {m - 1} degrees of freedom "
                            f"(t quantile {q:.2f})")
        method, ratio = "delta-log", math.exp(theta)
        result = dict(log_ratio=theta, std_error=se, quantile=q, df=df, variance_source=source, p_value=p_value)
    else:
        lower = _bounds_lower(agg_c.ci_low, agg_b.ci_high)
        regressed = max_ratio is not None and lower > max_ratio
        method, ratio = "bounds", _ratio(pc, pb)
        warnings.append(f"{hits_c:.3g} effective candidate and {hits_b:.3g} effective baseline hits (fewer than "
                        f"{MIN_HARMFUL} on a side): the ratio's lower bound is the candidate's lower interval end over the "
                        "baseline's upper end")
        result = dict(log_ratio=None, std_error=None, quantile=None, df=None, variance_source=None, p_value=None)
    q_prompt = float(stats.norm.ppf(1.0 - alpha / m))
    per_prompt = [_prompt_regression(i, a, b, mo, max_ratio, q_prompt)
                  for i, (a, b, mo) in enumerate(zip(cr, br, moments), 1)]
    per_prompt.sort(key=lambda r: (-r.ratio_lower, -(r.ratio if r.ratio is not None else 0.0),
                                   -(r.p_candidate - r.p_baseline)))
    return Regression(max_ratio=max_ratio, confidence=confidence, method=method, p_candidate=pc, p_baseline=pb,
                      ratio=ratio, ratio_lower=lower, regressed=bool(regressed), paired=paired,
                      per_prompt=tuple(per_prompt), warnings=tuple(warnings), **result)


def _prompt_regression(index: int, cand: PromptResult, base: PromptResult, mo: PairedMoments,
                       max_ratio: float | None, q: float) -> PromptRegression:
    ec, eb = cand.estimate, base.estimate
    ratio = _ratio(ec.p_hat, eb.p_hat)
    # With fewer than 5 hits a side's variance estimate means little (under common random
    # numbers one shared hit makes the log ratio look exact): use the interval ends instead.
    if ec.p_hat > 0 and eb.p_hat > 0 and not ec.upper_bound_only and not eb.upper_bound_only:
        var = max(0.0, mo.vcc / ec.p_hat ** 2 - 2 * mo.vcb / (ec.p_hat * eb.p_hat) + mo.vbb / eb.p_hat ** 2)
        lower = math.exp(math.log(ratio) - q * math.sqrt(var)) if math.isfinite(var) else 0.0
        method = "delta-log"
    else:
        lower = _bounds_lower(ec.ci_low, eb.ci_high)
        method = "bounds"
    return PromptRegression(index, cand.prompt.text, cand.prompt.category, ec.p_hat, eb.p_hat,
                            (ec.ci_low, ec.ci_high), (eb.ci_low, eb.ci_high), ratio, lower, method,
                            bool(max_ratio is not None and lower > max_ratio))


# --- a whole check ---------------------------------------------------------------------------------


@dataclass
class Side:
    """One estimated model: the candidate or the baseline."""

    role: str
    model: ModelConfig
    report: EstimationReport
    extrapolations: dict

    def to_dict(self) -> dict:
        data = self.report.to_dict()
        for e in data["estimates"]:  # reports are exported: prompts redacted as in the store
            e["prompt"] = redact(e["prompt"])
        data["role"] = self.role
        data["model"] = self.model.ref
        data["extrapolations"] = self.extrapolations
        return data


@dataclass
class CheckResult:
    monitor: str
    config_path: str
    prompt_source: str
    seed: int
    confidence: float
    options: GateOptions
    candidate: Side
    baseline: Side | None = None
    regression: Regression | None = None
    gates: list[Gate] = field(default_factory=list)
    sensitivity: object | None = None
    """A `tailmon.check.sensitivity.Sensitivity` when the check ran with perturbations."""
    history_baseline: dict | None = None
    """The production monitor's pooled figures when they were the baseline (--baseline-from-history)."""
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """`fail` when a gate fails, else `inconclusive` when one is, else `pass`."""
        verdicts = {g.verdict for g in self.gates}
        return "fail" if "fail" in verdicts else "inconclusive" if "inconclusive" in verdicts else "pass"

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def prompt_flags(self) -> list[dict]:
        """Per prompt (in prompt order): the thresholds it is shown to break on its own (the JUnit
        per-prompt cases). Evidence, not doubt: its interval lies wholly above max-p, or its
        regression beyond max-ratio is significant after Bonferroni. A wide interval that merely
        reaches above max-p flags nothing here; the gate on the mean already counts it."""
        cand = self.candidate.report.results
        by_index = {r.index: r for r in self.regression.per_prompt} if self.regression else {}
        flags = []
        for i, r in enumerate(cand, 1):
            failures = []
            e = r.estimate
            if self.options.max_p is not None and e.ci_low > self.options.max_p:
                failures.append(f"P(harm) {e.p_hat:.3g}, lower bound {e.ci_low:.3g} > max-p {self.options.max_p:.3g}")
            reg = by_index.get(i)
            if reg is not None and reg.regressed:
                low = "inf" if math.isinf(reg.ratio_lower) else f"{reg.ratio_lower:.3g}"
                failures.append(f"regressed: ratio lower bound {low} > max-ratio {self.options.max_ratio:.3g} "
                                "(Bonferroni over prompts)")
            flags.append({"index": i, "failures": failures})
        return flags

    def to_dict(self) -> dict:
        o = self.options
        return {
            "tailmon_version": __version__,
            "command": "check",
            "verdict": self.verdict,
            "exit_code": 0 if self.passed else 1,
            "monitor": self.monitor,
            "config": self.config_path,
            "prompt_source": self.prompt_source,
            "n_prompts": len(self.candidate.report.results),
            "seed": self.seed,
            "confidence": self.confidence,
            "thresholds": {"max_p": o.max_p, "max_expected": o.max_expected, "window": o.window,
                           "max_ratio": o.max_ratio},
            "gates": [g.to_dict() for g in self.gates],
            "candidate": self.candidate.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "baseline_from_history": self.history_baseline,
            "regression": _redacted_regression(self.regression),
            "prompt_flags": self.prompt_flags(),
            "sensitivity": self.sensitivity.to_dict() if self.sensitivity is not None else None,
            "warnings": list(self.warnings),
        }


def _redacted_regression(reg: Regression | None) -> dict | None:
    if reg is None:
        return None
    data = reg.to_dict()
    for p in data["per_prompt"]:
        p["prompt"] = redact(p["prompt"])
    return data


def run_check(mon: EstimationSettings, prompts: Sequence[PromptItem], *, candidate: ModelConfig,
              baseline: ModelConfig | None, seed: int, options: GateOptions, config_path: str = "",
              prompt_source: str = "", perturb=None, load=load_model, progress: Progress | None = None,
              add_total: Progress | None = None, history: dict | None = None) -> CheckResult:
    """Estimate the candidate (and baseline) on `prompts`, apply the gates, optionally perturb.

    `perturb`: a `tailmon.check.sensitivity.PerturbOptions` (sensitivity of the candidate);
    `load(model_config, role)` gives an engine; `progress(n)` is called per n samples drawn and
    `add_total(n)` when perturbation adds n samples to the work announced at the start.
    `history`: the production monitor's pooled figures (`tailmon.estimation.history.series_figures`)
    as the baseline of the ratio gate, instead of estimating a baseline model (`history_ratio_gate`).
    """
    if baseline is not None and history is not None:
        raise InputError("give a baseline model or the baseline from history, not both")
    options.validate(mon, baseline is not None or history is not None)
    if not prompts:
        raise InputError("no prompts to check")
    judge = parse_judge(mon.judge)  # one judge for both sides: the same scorer, one model load
    cand_plan = plan_for_monitor(mon, seed, prompts, model=candidate, judge=judge)
    base_plan = plan_for_monitor(mon, seed, prompts, model=baseline, judge=judge) if baseline is not None else None
    engines: dict[object, object] = {}

    lora = mon.engine_settings().enable_lora

    def engine_for(mc: ModelConfig, role: str):
        key = mc.engine_settings(enable_lora=lora)
        if key not in engines:  # candidate and baseline on one checkpoint share one engine
            engines[key] = load(mc, role, enable_lora=lora)
        return engines[key]

    try:
        cand_engine = engine_for(candidate, "candidate")
        base_engine = engine_for(baseline, "baseline") if baseline is not None else None
        windows = [options.window] if mon.volume is not None else []
        judge_warnings = []

        def estimate(engine, plan, role):
            judge.new_run()  # per side, as the daemon does per run: its problem counts are this side's
            report = estimate_role(engine, plan, prompts, role, progress)
            judge_warnings.extend(f"{role} judge: {w}" for w in judge.warnings())
            return report

        cand_report = estimate(cand_engine, cand_plan, "candidate")
        cand_side = Side("candidate", candidate, cand_report, monitor_extrapolations(cand_report, mon, windows))
        result = CheckResult(mon.name, config_path, prompt_source, seed, mon.estimator.confidence, options, cand_side)
        if baseline is not None:
            base_report = estimate(base_engine, base_plan, "baseline")
            result.baseline = Side("baseline", baseline, base_report, monitor_extrapolations(base_report, mon, windows))
            result.regression = regression_test(cand_report, base_report, options.max_ratio, mon.estimator.confidence)
        agg = cand_report.aggregate().to_dict()
        cand_u = unreliable_side(cand_report, "candidate")
        result.gates = absolute_gates(agg, cand_side.extrapolations, options, mon.estimator.confidence, cand_u)
        if result.regression is not None and result.regression.gate() is not None:
            base_u = unreliable_side(result.baseline.report, "baseline")
            result.gates.append(ratio_gate(result.regression, cand_report, result.baseline.report, cand_u, base_u))
            result.warnings += list(result.regression.warnings)
        if history is not None and options.max_ratio is not None:
            result.history_baseline = history
            result.gates.append(history_ratio_gate(agg, cand_u, history, options.max_ratio, mon.estimator.confidence))
        result.warnings += judge_warnings
        n_unreliable = cand_report.aggregate().n_unreliable
        if n_unreliable:
            result.warnings.append(f"{n_unreliable} of {len(prompts)} candidate per-prompt estimates are unreliable: "
                                   "read their upper bounds, not their point estimates")
        if perturb is not None:
            result.sensitivity = run_sensitivity(cand_engine, cand_plan, prompts, perturb, progress=progress,
                                                 add_total=add_total, original=cand_report, role="candidate")
        return result
    finally:
        for engine in engines.values():
            engine.close()  # vLLM's engine-core process does not outlive the check


def _num(x):
    """JSON-safe number: inf and nan become None (the estimate JSON's rule)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _is_inf(x) -> bool:
    return x is not None and math.isinf(x)
