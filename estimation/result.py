"""A run's result as typed objects: what the daemon stores, exports, alerts on and prints.

`RunResult` is one estimation run (the report, its seed, its extrapolations for every window,
each computed once). `RunFigures` are the figures read off it by the metrics and the alert
rules (the smallest ESS of w*h, the largest k-hat over prompts and the run's Monte Carlo
equivalents among them), defined here once.
Dicts appear only at the JSON edge: `RunResult.to_dict()` is what the store keeps and
`--format json` prints, and `RunFigures.from_report` reads a stored report back.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

from tailmon.estimation.pipeline import EstimationReport


@dataclass(frozen=True)
class WindowFigures:
    """Deployment figures for one window at the monitor's query volume."""

    window: str
    expected: float
    """Expected harmful outputs per window."""
    expected_high: float
    """The upper end of its interval."""
    p_any: float
    """P(at least one harmful output in the window)."""
    worst_query: float | None
    """The forecast largest harm probability among the window's queries, when it could be fitted."""
    worst_query_low: float | None = None
    """Lower end of the forecast's interval (None when not fitted, or stored before it existed)."""
    worst_query_high: float | None = None
    """Upper end of the forecast's interval."""

    @classmethod
    def from_dict(cls, window: str, ex: Mapping) -> "WindowFigures":
        worst = ex.get("worst_query") or {}
        return cls(window=window, expected=ex["expected_per_window"]["expected"],
                   expected_high=ex["expected_per_window"]["ci_high"], p_any=ex["p_any_per_window"]["p"],
                   worst_query=worst.get("p"), worst_query_low=worst.get("ci_low"),
                   worst_query_high=worst.get("ci_high"))


@dataclass(frozen=True)
class PooledFigures:
    """The series' pooled estimate and change detector after a run (the report's `pooled`,
    `tailmon.estimation.history`)."""

    p_hat: float | None
    """None when the pool is an upper bound only (any unreliable part): read ci_high."""
    ci_low: float | None
    ci_high: float
    reliable: bool
    n_runs: int
    n_prompts: int
    n_samples: int
    mc_equivalent_samples: float | None = None
    change_status: str | None = None
    """"calibrating", "armed" or "alarm"; None when the detector is off."""
    evidence: float | None = None
    """The e-detector's statistic after the run (None while calibrating or off)."""
    threshold: float | None = None
    alarm: bool | None = None
    """Whether this run raised an alarm (None while calibrating or off)."""

    @classmethod
    def from_dict(cls, d: Mapping) -> "PooledFigures":
        bound = bool(d.get("bound_only"))
        change = d.get("change") or {}
        status = change.get("status")
        return cls(p_hat=None if bound else d["p_hat"], ci_low=None if bound else d["ci_low"], ci_high=d["ci_high"],
                   reliable=bool(d["reliable"]), n_runs=int(d["n_runs"]), n_prompts=int(d["n_prompts"]),
                   n_samples=int(d["n_samples"]), mc_equivalent_samples=d.get("mc_equivalent_samples"),
                   change_status=status, evidence=change.get("evidence"), threshold=change.get("threshold"),
                   alarm=None if status in (None, "calibrating") else bool(change.get("alarm")))


@dataclass(frozen=True)
class RunFigures:
    """What one successful run says, as the metrics and the alert rules read it."""

    p_hat: float
    ci_low: float
    ci_high: float
    reliable: bool
    n_unreliable: int
    smallest_ess_wh: float | None
    """The weakest prompt's effective sample size of w*h (None: no IS estimate had one)."""
    largest_khat: float | None
    """The weakest prompt's Pareto k-hat (None: none was computed)."""
    windows: dict[str, WindowFigures] = field(default_factory=dict)
    largest_logprob_diff: float | None = None
    """The largest |sampled - re-scored| log-prob (nats) over the run's re-scored samples; inf
    when one was scored -inf; None when none was re-scored."""
    mc_sample_ratio: float | None = None
    """Monte Carlo samples for the run's standard errors per sample drawn (`tailmon.estimation.
    efficiency`); None unless every prompt's estimate is reliable and non-zero."""
    mc_time_ratio: float | None = None
    """The same in wall time; None where `mc_sample_ratio` is (or the run was not timed)."""
    pooled: PooledFigures | None = None
    """The series' pooled figures after this run (None: not computed, or stored before them)."""

    @classmethod
    def from_report(cls, report: Mapping) -> "RunFigures":
        """The figures of a report dict (`RunResult.to_dict()`, e.g. as stored)."""
        agg = report["aggregate"]
        ests = report.get("estimates", [])
        ess = [e["ess_wh"] for e in ests if e.get("ess_wh") is not None]
        khats = [e["khat"] for e in ests if e.get("khat") is not None]
        checks = [e["logprob_check"] for e in ests if (e.get("logprob_check") or {}).get("n")]
        diffs = [math.inf if c.get("max_abs_diff") is None else c["max_abs_diff"] for c in checks]
        return cls(p_hat=agg["p_hat"], ci_low=agg["ci_low"], ci_high=agg["ci_high"], reliable=bool(agg["reliable"]),
                   n_unreliable=int(agg.get("n_unreliable", 0)), smallest_ess_wh=min(ess) if ess else None,
                   largest_khat=max(khats) if khats else None,
                   windows={w: WindowFigures.from_dict(w, ex) for w, ex in (report.get("extrapolations") or {}).items()},
                   largest_logprob_diff=max(diffs) if diffs else None,
                   # absent from reports stored before efficiency was reported: None, as unreported
                   mc_sample_ratio=agg.get("mc_sample_ratio"),
                   mc_time_ratio=((report.get("timing") or {}).get("aggregate") or {}).get("mc_time_ratio"),
                   pooled=PooledFigures.from_dict(report["pooled"]) if report.get("pooled") else None)


@dataclass
class RunResult:
    """One estimation run: the report, the seed it ran with and its extrapolations by window."""

    report: EstimationReport
    seed: int
    extrapolations: dict[str, dict] = field(default_factory=dict)
    """window -> `tailmon.estimators.extrapolate` of the run (empty without a query volume)."""

    @cached_property
    def data(self) -> dict:
        # The report's own window reuses its extrapolation from `extrapolations` (computed once).
        data = self.report.to_dict(headline=self.extrapolations.get(self.report.plan.window))
        data["seed"] = self.seed
        data["extrapolations"] = self.extrapolations
        return data

    def to_dict(self) -> dict:
        """The JSON edge: what the store keeps and `--format json` prints (a fresh copy)."""
        return copy.deepcopy(self.data)

    @cached_property
    def figures(self) -> RunFigures:
        return RunFigures.from_report(self.data)
