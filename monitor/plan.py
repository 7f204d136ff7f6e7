"""How a monitor's configuration becomes one run: its prompts, its EstimationPlan and its
extrapolations. One definition for the daemon and `tailmon check`, so a release gate estimates
exactly what the monitor will estimate in production.
"""

from __future__ import annotations

from typing import Sequence

from tailmon.estimators import extrapolate, scale_volume
from tailmon.monitor.config import LoadedConfig, ModelConfig, MonitorConfig
from tailmon.monitor.pipeline import EstimationPlan, EstimationReport
from tailmon.monitor.prompts import PromptItem


def headline_window(mon: MonitorConfig) -> str:
    """The window of a report's own extrapolation: 1d when configured, else the first window."""
    volume = mon.volume
    return "1d" if volume is None or "1d" in volume.windows else volume.windows[0]


def plan_for_monitor(mon: MonitorConfig, seed: int, prompts: Sequence[PromptItem] = (), *,
                     model: ModelConfig | None = None, judge=None) -> EstimationPlan:
    """The EstimationPlan of one run of a monitor on `prompts` (every daemon run builds its plan here).

    `model` replaces the monitor's model settings (a candidate checkpoint, another deployed
    system prompt); `judge` is an already built judge for `mon.judge` (the daemon keeps judges
    loaded between runs), else it is parsed here. A monitor with method `is` and no proposals
    gets the shipped library's adversarial system prompts for the categories of `prompts`, as
    a daemon run does.
    """
    from tailmon.judges import parse_judge
    from tailmon.proposals import default_proposals, parse_proposal

    specs = [p.spec for p in mon.proposals]
    weights = [p.weight for p in mon.proposals] or None
    if mon.estimator.method == "is" and not specs:
        specs, weights = default_proposals({p.category for p in prompts}), None
    est = mon.estimator
    volume = mon.volume
    window = headline_window(mon)
    return EstimationPlan(
        target=(model or mon.model).target(),
        judge=judge if judge is not None else parse_judge(mon.judge),
        method=est.method,
        proposals=[parse_proposal(s) for s in specs],
        weights=weights,
        defensive=est.defensive,
        n_samples=est.samples,
        seed=seed,
        confidence=est.confidence,
        volume=None if volume is None else scale_volume(volume.per_day, window),
        window=window,
    )


def monitor_extrapolations(report: EstimationReport, mon: MonitorConfig, extra_windows: Sequence[str] = ()) -> dict:
    """Expected harmful outputs, P(at least one) and the worst query per window (the daemon's
    `extrapolations`), for every configured window and `extra_windows`; {} without a volume."""
    if mon.volume is None:
        return {}
    agg = report.aggregate()
    ests = [r.estimate for r in report.results]
    windows = list(dict.fromkeys([*mon.volume.windows, *extra_windows]))
    return {w: extrapolate(ests, agg, scale_volume(mon.volume.per_day, w), w) for w in windows}


def draw_prompts(loaded: LoadedConfig, mon: MonitorConfig, seed: int) -> tuple[list[PromptItem], str]:
    """The monitor's per_run prompts from its source, drawn as the daemon draws a run's."""
    from tailmon.monitor.sources import build_source, sample_prompts

    src = mon.prompts
    source = build_source(src, loaded.base_dir)
    prompts = sample_prompts(source, src.per_run, seed, dedupe=src.dedupe, min_chars=src.min_chars,
                             max_chars=src.max_chars, stratify=src.stratify)
    return prompts, source.describe()
