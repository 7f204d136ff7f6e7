"""How estimation settings become one run: its prompts, its EstimationPlan and its
extrapolations. One definition for the daemon, `tailmon estimate` and `tailmon check`, so a
release gate estimates exactly what the monitor will estimate in production.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tailmon.engines.base import Variant
from tailmon.estimation.pipeline import RESCORE_SAMPLES, RESCORE_TOLERANCE, EstimationPlan, EstimationReport
from tailmon.estimation.prompts import PromptItem
from tailmon.estimation.settings import EstimationSettings, ModelConfig
from tailmon.estimation.sources import build_source, sample_prompts
from tailmon.estimators import extrapolate, scale_volume
from tailmon.judges import Judge, parse_judge
from tailmon.proposals import default_proposals, parse_proposal
from tailmon.proposals.adaptive import hot_spec


def headline_window(mon: EstimationSettings) -> str:
    """The window of a report's own extrapolation: 1d when configured, else the first window."""
    volume = mon.volume
    return "1d" if volume is None or "1d" in volume.windows else volume.windows[0]


def build_plan(target: Variant, judge: str | Judge, proposals: Sequence[str], *, method: str = "is",
               weights: Sequence[float] | None = None, defensive: float = 0.1, samples: int = 200, seed: int = 0,
               confidence: float = 0.95, volume: float | None = None, window: str = "1d",
               rescore_samples: int = RESCORE_SAMPLES, rescore_tolerance: float = RESCORE_TOLERANCE) -> EstimationPlan:
    """The EstimationPlan of one estimate: every run of the daemon, `tailmon check` and
    `tailmon estimate` build theirs here, so that specs are parsed and checked one way.

    `judge` is a spec or an already built judge (the daemon keeps judges loaded between runs);
    `proposals` are proposal specs, with relative `weights` in what `defensive` leaves (None:
    equal shares); `volume` is queries per `window`.
    """
    return EstimationPlan(
        target=target,
        judge=parse_judge(judge) if isinstance(judge, str) else judge,
        method=method,
        proposals=[parse_proposal(s) for s in proposals],
        weights=weights,
        defensive=defensive,
        n_samples=samples,
        seed=seed,
        confidence=confidence,
        volume=volume,
        window=window,
        rescore_samples=rescore_samples,
        rescore_tolerance=rescore_tolerance,
    )


def adaptive_start_specs(mon: EstimationSettings, prompts: Sequence[PromptItem]) -> list[str]:
    """The starting components of an adaptive monitor's mixture: its own proposals, or the
    library's system prompts for the categories of `prompts` and the target at a hotter
    temperature (what finds hits before an adapter has been learnt)."""
    if mon.proposals:
        return [p.spec for p in mon.proposals]
    return default_proposals({p.category for p in prompts}) + [
        hot_spec(mon.model.target(), mon.adaptive.learner_settings())]


def plan_for_monitor(mon: EstimationSettings, seed: int, prompts: Sequence[PromptItem] = (), *,
                     model: ModelConfig | None = None, judge: Judge | None = None,
                     mixture: tuple[Sequence[str], Sequence[float], float] | None = None) -> EstimationPlan:
    """The EstimationPlan of one run of a monitor on `prompts`.

    `model` replaces the monitor's model settings (a candidate checkpoint, another deployed
    system prompt); `judge` is an already built judge for `mon.judge`, else it is parsed here. A
    monitor with method `is` and no proposals gets the shipped library's adversarial system
    prompts for the categories of `prompts`, as a daemon run does. `mixture` (proposal specs, their
    relative weights and the target's share) replaces the monitor's proposals and defensive share:
    an adaptive monitor's learnt mixture.
    """
    specs = [p.spec for p in mon.proposals]
    weights = [p.weight for p in mon.proposals] or None
    est = mon.estimator
    defensive = est.defensive
    if mixture is not None:
        specs, weights, defensive = list(mixture[0]), list(mixture[1]), float(mixture[2])
    elif est.method == "is" and not specs:
        specs, weights = default_proposals({p.category for p in prompts}), None
    window = headline_window(mon)
    return build_plan((model or mon.model).target(), judge if judge is not None else mon.judge, specs,
                      method=est.method, weights=weights, defensive=defensive, samples=est.samples, seed=seed,
                      confidence=est.confidence,
                      volume=None if mon.volume is None else scale_volume(mon.volume.per_day, window), window=window,
                      rescore_samples=est.rescore_samples, rescore_tolerance=est.rescore_tolerance)


def monitor_extrapolations(report: EstimationReport, mon: EstimationSettings, extra_windows: Sequence[str] = ()) -> dict:
    """Expected harmful outputs, P(at least one) and the worst query per window (the daemon's
    `extrapolations`), for every configured window and `extra_windows`; {} without a volume."""
    if mon.volume is None:
        return {}
    agg = report.aggregate()
    ests = [r.estimate for r in report.results]
    windows = list(dict.fromkeys([*mon.volume.windows, *extra_windows]))
    return {w: extrapolate(ests, agg, scale_volume(mon.volume.per_day, w), w, confidence=report.plan.confidence)
            for w in windows}


def draw_prompts(mon: EstimationSettings, base_dir: Path, seed: int) -> tuple[list[PromptItem], str]:
    """The monitor's per_run prompts from its source (relative paths from `base_dir`, the
    config file's folder), drawn as the daemon draws a run's."""
    src = mon.prompts
    source = build_source(src, base_dir)
    prompts = sample_prompts(source, src.per_run, seed, dedupe=src.dedupe, min_chars=src.min_chars,
                             max_chars=src.max_chars, stratify=src.stratify)
    return prompts, source.describe()
