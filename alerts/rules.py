"""Alert rules as pure functions: (run figures, previous state, now) -> next state.

Nothing here reads a clock, a database or the network: `now` is passed in (as APScheduler's
triggers take it), so every transition can be tested by stepping time by hand.

The state machine of one (monitor, rule):

    inactive/resolved --breach--> pending --breach x for--> firing --not past resolve_threshold--> resolved
                      <--no breach--

* breach: `value op threshold`. `for` consecutive breaches fire (for: 1 fires at once).
* A firing alert stays firing while the value is still past `resolve_threshold` (hysteresis; it
  defaults to the threshold), and is notified again every `repeat_interval` while it does.
* A figure the run does not have (a failed run has no harm probability; the worst-query fit may
  be impossible) leaves the state as it is: no evidence either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from tailmon.alerts.config import (
    BUILTIN_RISK_INCREASE,
    BUILTIN_UNRELIABLE,
    METRICS,
    STALENESS,
    AlertRuleConfig,
    seconds,
)
from tailmon.estimation.result import RunFigures

ACTIVE = ("pending", "firing")
GAUGE_VALUE = {"inactive": 0, "resolved": 0, "pending": 1, "firing": 2}


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    op: str
    threshold: float
    resolve_threshold: float
    for_runs: int = 1
    window: str | None = None
    severity: str = "warning"
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    repeat_interval: timedelta = timedelta(hours=4)
    sinks: tuple[str, ...] | None = None
    """None: every sink."""

    @property
    def key(self) -> str:
        """The figure this rule reads: `metric` or `metric[window]`."""
        return figure_key(self.metric, self.window)

    @property
    def staleness(self) -> bool:
        return self.metric == STALENESS

    def describe(self) -> str:
        return f"{self.key} {self.op} {self.threshold:g}"


def figure_key(metric: str, window: str | None = None) -> str:
    return f"{metric}[{window}]" if window else metric


def _configured(base: Rule, cfg: AlertRuleConfig | None) -> Rule:
    """A built-in rule with what the config's entry for it sets (`for_runs` only when given)."""
    if cfg is None:
        return base
    return replace(base, for_runs=cfg.for_runs if "for_runs" in cfg.model_fields_set else base.for_runs,
                   severity=cfg.severity, labels=dict(cfg.labels),
                   annotations={**base.annotations, **cfg.annotations},
                   repeat_interval=timedelta(seconds=seconds(cfg.repeat_interval, "repeat_interval")),
                   sinks=cfg.sinks)


def builtin_unreliable(cfg: AlertRuleConfig | None = None) -> Rule:
    """The aggregate is not reliable (figure estimate_unreliable = 1)."""
    base = Rule(BUILTIN_UNRELIABLE, "estimate_unreliable", ">=", 1.0, 1.0, for_runs=1,
                annotations={"summary": "the estimate's weight diagnostics say it is unreliable "
                                        "(k-hat, ESS of w*h or too few harmful samples)"})
    return _configured(base, cfg)


def builtin_risk_increase(cfg: AlertRuleConfig | None = None) -> Rule:
    """The change detector raised an alarm (figure risk_increase_alarm = 1). It stays firing while
    the detector re-arms on the runs after the alarm (the figure is absent then) and resolves at
    the run that arms it against the new level."""
    base = Rule(BUILTIN_RISK_INCREASE, "risk_increase_alarm", ">=", 1.0, 1.0, for_runs=1,
                annotations={"summary": "the series' risk rose above its reference (the pooled history, or the "
                                        "previous model version's): the change detector's evidence passed 1/alpha"})
    return _configured(base, cfg)


def compile_rules(configs) -> list[Rule]:
    """A monitor's enabled rules; the built-in unreliable-estimate and risk-increase rules unless
    configured otherwise."""
    rules = []
    builtin = None
    risk = None
    for cfg in configs:
        if cfg.name == BUILTIN_UNRELIABLE:
            builtin = cfg
            continue
        if cfg.name == BUILTIN_RISK_INCREASE:
            risk = cfg
            continue
        if not cfg.enabled:
            continue
        rules.append(Rule(
            name=cfg.name, metric=cfg.metric, op=cfg.op, threshold=float(cfg.threshold),
            resolve_threshold=float(cfg.threshold if cfg.resolve_threshold is None else cfg.resolve_threshold),
            for_runs=cfg.for_runs, window=cfg.window, severity=cfg.severity, labels=dict(cfg.labels),
            annotations=dict(cfg.annotations),
            repeat_interval=timedelta(seconds=seconds(cfg.repeat_interval, "repeat_interval")),
            sinks=cfg.sinks))
    if builtin is None or builtin.enabled:
        rules.insert(0, builtin_unreliable(builtin))
    if risk is None or risk.enabled:
        rules.append(builtin_risk_increase(risk))
    return rules


def run_figures(status: str, figures: RunFigures | None) -> dict[str, float]:
    """The figures rules read from one ended run (`figures`: a successful run's).

    A failed run yields run_failed = 1 only; an interrupted one nothing (the daemon stopped; a
    dead daemon shows as staleness). ESS and k-hat are the exported metrics' (the weakest prompt).
    """
    if status == "failed":
        return {"run_failed": 1.0}
    if status != "succeeded" or figures is None:
        return {}
    out = {
        "run_failed": 0.0,
        "harm_probability": figures.p_hat,
        "harm_probability_lower_bound": figures.ci_low,
        "harm_probability_upper_bound": figures.ci_high,
        "estimate_unreliable": 0.0 if figures.reliable else 1.0,
        "effective_sample_size": figures.smallest_ess_wh,
        "pareto_khat": figures.largest_khat,
    }
    pooled = figures.pooled
    if pooled is not None:
        out.update({"pooled_harm_probability": pooled.p_hat, "pooled_harm_probability_lower_bound": pooled.ci_low,
                    "pooled_harm_probability_upper_bound": pooled.ci_high,
                    "pooled_estimate_unreliable": 0.0 if pooled.reliable else 1.0,
                    "risk_increase_evidence": pooled.evidence,
                    "risk_increase_alarm": None if pooled.alarm is None else float(pooled.alarm)})
    for window, w in figures.windows.items():
        out[figure_key("expected_harmful_outputs", window)] = w.expected
        out[figure_key("expected_harmful_outputs_upper_bound", window)] = w.expected_high
        out[figure_key("any_harmful_output_probability", window)] = w.p_any
        out[figure_key("worst_query_harm_probability", window)] = w.worst_query
        out[figure_key("worst_query_harm_probability_upper_bound", window)] = w.worst_query_high
    return {k: float(v) for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class State:
    """What the store keeps per (monitor, rule)."""

    state: str = "inactive"
    consecutive: int = 0
    """Consecutive evaluations past the threshold (pending) or still active (firing)."""
    since: datetime | None = None
    """When the current state began."""
    last_notified: datetime | None = None
    """When a firing notification was last sent: the repeat interval counts from here, across restarts."""
    last_value: float | None = None


@dataclass(frozen=True)
class Step:
    state: State
    transition: str | None = None
    """The new state's name when it changed (recorded as an alert event)."""
    notify: str | None = None
    """'firing' or 'resolved' when the sinks are to hear about it."""
    repeat: bool = False
    """A reminder of an alert already firing, not a new one."""
    fired_at: datetime | None = None
    """When the alert (still firing, or just resolved) began firing."""


def _past(value: float, op: str, threshold: float) -> bool:
    return {">": value > threshold, ">=": value >= threshold, "<": value < threshold,
            "<=": value <= threshold}[op]


def evaluate(rule: Rule, figures: dict[str, float], prev: State, now: datetime) -> Step:
    """The next state of `rule` given this evaluation's figures. Pure."""
    value = figures.get(rule.key)
    if value is None or not math.isfinite(value):
        return Step(prev)
    if prev.state == "firing":
        if _past(value, rule.op, rule.resolve_threshold):
            kept = replace(prev, consecutive=prev.consecutive + 1, last_value=value)
            if prev.last_notified is None or now - prev.last_notified >= rule.repeat_interval:
                return Step(replace(kept, last_notified=now), notify="firing", repeat=True, fired_at=prev.since)
            return Step(kept, fired_at=prev.since)
        return Step(State("resolved", 0, now, prev.last_notified, value), "resolved", "resolved", fired_at=prev.since)
    if _past(value, rule.op, rule.threshold):
        n = prev.consecutive + 1
        if n >= rule.for_runs:
            return Step(State("firing", n, now, now, value), "firing", "firing", fired_at=now)
        if prev.state != "pending":
            return Step(State("pending", n, now, prev.last_notified, value), "pending")
        return Step(replace(prev, consecutive=n, last_value=value))
    if prev.state == "pending":  # the streak broke before the for-count: never fired
        return Step(State("inactive", 0, now, prev.last_notified, value), "inactive")
    return Step(replace(prev, consecutive=0, last_value=value))


def message(monitor: str, rule: Rule, step_state: str, value: float | None) -> str:
    """One line for logs, events and notifications."""
    shown = "no value" if value is None else f"{rule.key} = {value:.4g}"
    if step_state == "resolved":
        return f"{monitor}/{rule.name} resolved: {shown} (fires at {rule.op} {rule.threshold:g})"
    return f"{monitor}/{rule.name} {step_state}: {shown} {rule.op} {rule.threshold:g}"


__all__ = ["ACTIVE", "GAUGE_VALUE", "METRICS", "Rule", "State", "Step", "builtin_risk_increase", "builtin_unreliable",
           "compile_rules",
           "evaluate", "figure_key", "message", "run_figures"]
