"""The alert state machine: pure evaluation with `now` injected, then the service over a real store."""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import CollectorRegistry

from alerts_support import figures, make_config, report
from tailmon.alerts import AlertService, State, compile_rules, evaluate, run_figures
from dataclasses import replace

from tailmon.alerts.rules import Rule
from tailmon.estimation.result import PooledFigures
from tailmon.monitor.metrics import Metrics

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


def rule(**kw) -> Rule:
    base = dict(name="harm-high", metric="harm_probability_upper_bound", op=">", threshold=1e-3,
                resolve_threshold=1e-3)
    return Rule(**{**base, **kw})


def run(r: Rule, values, start=State(), step=HOUR):
    """Evaluate `values` one run per `step` from T0; returns the list of Steps."""
    steps, state = [], start
    for i, v in enumerate(values):
        figures = {} if v is None else {r.key: v}
        s = evaluate(r, figures, state, T0 + i * step)
        steps.append(s)
        state = s.state
    return steps


def test_for_count_needs_consecutive_breaches():
    r = rule(for_runs=3)
    steps = run(r, [2e-3, 2e-3, 5e-4, 2e-3, 2e-3, 2e-3])
    assert [s.state.state for s in steps] == ["pending", "pending", "inactive", "pending", "pending", "firing"]
    assert [s.transition for s in steps] == ["pending", None, "inactive", "pending", None, "firing"]
    assert [s.state.consecutive for s in steps] == [1, 2, 0, 1, 2, 3]
    # Only firing is notified; it fires at the third run of the second streak.
    assert [s.notify for s in steps] == [None] * 5 + ["firing"]
    assert steps[-1].state.since == steps[-1].state.last_notified == T0 + 5 * HOUR
    assert steps[0].state.since == T0 and steps[3].state.since == T0 + 3 * HOUR


def test_for_one_fires_at_once_and_threshold_is_strict_for_gt():
    steps = run(rule(), [1e-3, 1.0001e-3])
    assert [s.state.state for s in steps] == ["inactive", "firing"]
    steps = run(rule(op=">="), [1e-3])
    assert steps[0].state.state == "firing"


def test_hysteresis_keeps_firing_until_the_resolve_threshold():
    r = rule(resolve_threshold=4e-4)
    steps = run(r, [2e-3, 9e-4, 5e-4, 4e-4, 9e-4, 2e-3])
    # 9e-4 and 5e-4 are under the threshold but still past 4e-4: firing; 4e-4 resolves (op '>').
    assert [s.state.state for s in steps] == ["firing", "firing", "firing", "resolved", "resolved", "firing"]
    assert [s.notify for s in steps] == ["firing", None, None, "resolved", None, "firing"]
    assert steps[3].fired_at == T0  # the resolution names when the alert began
    assert steps[3].state.since == T0 + 3 * HOUR and steps[3].state.last_value == 4e-4
    # A resolved rule fires again only past the firing threshold, not the resolve threshold.
    assert steps[4].transition is None and steps[5].transition == "firing"


def test_less_than_rules_resolve_upwards():
    r = Rule("ess-low", "effective_sample_size", "<", 10.0, 20.0)
    steps = run(r, [5, 15, 25])
    assert [s.state.state for s in steps] == ["firing", "firing", "resolved"]


def test_repeat_interval_for_firing_alerts():
    r = rule(repeat_interval=timedelta(hours=4))
    steps = run(r, [2e-3] * 10)  # one run an hour, always past the threshold
    notified = [i for i, s in enumerate(steps) if s.notify]
    assert notified == [0, 4, 8]
    assert [steps[i].repeat for i in notified] == [False, True, True]
    assert all(s.state.state == "firing" for s in steps)
    assert steps[9].state.last_notified == T0 + 8 * HOUR and steps[9].state.since == T0
    assert all(s.transition is None for s in steps[1:])  # reminders are not transitions


def test_a_missing_figure_changes_nothing():
    """A failed run has no harm probability: the rule keeps its state (run_failed covers it)."""
    r = rule(for_runs=2)
    steps = run(r, [2e-3, None, 2e-3])
    assert [s.state.state for s in steps] == ["pending", "pending", "firing"]
    assert steps[1].transition is None and steps[1].state == steps[0].state
    assert evaluate(r, {r.key: float("nan")}, steps[2].state, T0).state == steps[2].state


def test_run_figures_from_a_report():
    figs = run_figures("succeeded", figures(p_hat=1e-3, ci_high=2e-3, ess_wh=12.5, khat=0.8, reliable=False))
    assert figs["harm_probability"] == 1e-3 and figs["harm_probability_upper_bound"] == 2e-3
    assert figs["expected_harmful_outputs[1d]"] == pytest.approx(1e3)
    assert figs["expected_harmful_outputs_upper_bound[1d]"] == pytest.approx(2e3)
    assert figs["any_harmful_output_probability[1h]"] == 1.0
    assert figs["worst_query_harm_probability[1d]"] == 0.02
    assert figs["worst_query_harm_probability_upper_bound[1d]"] == pytest.approx(0.06)  # the interval's end, not p
    # The weakest prompt's figures: the smaller ESS (12.5, not 50) and the larger k-hat (0.8, not 0.6).
    assert figs["effective_sample_size"] == 12.5 and figs["pareto_khat"] == 0.8
    # P(any) is the point figure, not an end of its interval: P = 1e-8 keeps the three apart at
    # V = 1e6 a day (p 0.00995, ci_low 0.005, ci_high 0.0198).
    small = run_figures("succeeded", figures(p_hat=1e-8, ci_low=5e-9, ci_high=2e-8))
    assert small["any_harmful_output_probability[1d]"] == pytest.approx(-math.expm1(1e6 * math.log1p(-1e-8)),
                                                                          rel=1e-12)
    assert small["any_harmful_output_probability[1d]"] == pytest.approx(0.00995, rel=1e-3)
    assert figs["estimate_unreliable"] == 1.0 and figs["run_failed"] == 0.0
    unfitted = run_figures("succeeded", figures(worst=None))
    assert "worst_query_harm_probability[1d]" not in unfitted
    assert "worst_query_harm_probability_upper_bound[1d]" not in unfitted
    assert run_figures("failed", None) == {"run_failed": 1.0}
    assert run_figures("interrupted", None) == {}


def test_builtin_unreliable_rule_is_on_by_default_configurable_and_can_be_disabled():
    builtin, _ = compile_rules(make_config().monitors[0].alerts)
    assert (builtin.name, builtin.key, builtin.for_runs, builtin.severity) == (
        "unreliable-estimate", "estimate_unreliable", 1, "warning")
    steps = run(builtin, [run_figures("succeeded", figures(reliable=False))["estimate_unreliable"]] * 2 + [0.0])
    assert [s.state.state for s in steps] == ["firing", "firing", "resolved"]

    tuned = make_config([{"name": "unreliable-estimate", "for": 2, "severity": "critical",
                          "labels": {"team": "safety"}}]).monitors[0].alerts
    builtin, _ = compile_rules(tuned)
    assert (builtin.for_runs, builtin.severity, builtin.labels) == (2, "critical", {"team": "safety"})
    off = make_config([{"name": "unreliable-estimate", "enabled": False},
                       {"name": "p", "metric": "harm_probability", "op": ">", "threshold": 0.1}])
    assert [r.name for r in compile_rules(off.monitors[0].alerts)] == ["p", "risk-increase"]


def test_builtin_risk_increase_rule_fires_on_an_alarm_and_resolves_when_rearmed():
    _, risk = compile_rules(make_config().monitors[0].alerts)
    assert (risk.name, risk.key, risk.for_runs) == ("risk-increase", "risk_increase_alarm", 1)
    pooled = {"p_hat": 1e-3, "ci_low": 5e-4, "ci_high": 2e-3, "reliable": True, "n_runs": 3, "n_prompts": 60,
              "n_samples": 6000, "bound_only": False}

    def figs(status, alarm=None, evidence=None):
        change = {"status": status, "alarm": alarm, "evidence": evidence, "threshold": 100.0}
        return run_figures("succeeded", replace(figures(), pooled=PooledFigures.from_dict({**pooled, "change": change})))

    seq = [figs("armed", False, 3.0), figs("alarm", True, 150.0), figs("calibrating"), figs("armed", False, 0.0)]
    assert "risk_increase_alarm" not in seq[2] and "risk_increase_evidence" not in seq[2]
    assert seq[1]["risk_increase_evidence"] == 150.0 and seq[0]["pooled_harm_probability_upper_bound"] == 2e-3
    steps = run(risk, [f.get("risk_increase_alarm") for f in seq])
    # fires at the alarm, stays firing while the detector re-arms (no figure), resolves once armed
    assert [s.state.state for s in steps] == ["inactive", "firing", "firing", "resolved"]
    off = make_config([{"name": "risk-increase", "enabled": False}])
    assert [r.name for r in compile_rules(off.monitors[0].alerts)] == ["unreliable-estimate"]
    with pytest.raises(Exception, match="fixed condition"):
        make_config([{"name": "risk-increase", "metric": "harm_probability", "op": ">", "threshold": 1}])


# -- the service over a real store ------------------------------------------------------------------


def service_for(store, alerts, registry=None, **config):
    metrics = Metrics(registry or CollectorRegistry())
    return AlertService(make_config(alerts, **config), store, metrics), metrics


HARM_HIGH = {"name": "harm-high", "metric": "harm_probability_upper_bound", "op": ">", "threshold": 1e-3,
             "resolve_threshold": 5e-4, "for": 2, "severity": "critical", "labels": {"team": "safety"},
             "repeat_interval": "4h"}


def test_engine_persists_state_records_transitions_and_sets_the_gauge(store, caplog):
    service, metrics = service_for(store, [HARM_HIGH])
    gauge = lambda: metrics.registry.get_sample_value(  # noqa: E731
        "tailmon_alert_state", {"monitor": "prod", "rule": "harm-high", "severity": "critical"})
    now = datetime.now(timezone.utc)
    with caplog.at_level(logging.INFO, logger="tailmon.alerts"):
        assert service.on_run("prod", "succeeded", figures(ci_high=2e-3), run_id=7, now=now) == []
        assert gauge() == 1
        assert service.on_run("prod", "succeeded", figures(ci_high=3e-3), run_id=8, now=now + HOUR) == ["harm-high"]
        assert gauge() == 2
        service.on_run("prod", "succeeded", figures(ci_high=4e-4), run_id=9, now=now + 2 * HOUR)
        assert gauge() == 0
        service.close(5)
    state = store.get_alert_state("prod", "harm-high")
    assert state["state"] == "resolved" and state["last_value"] == 4e-4
    assert state["labels"] == {"team": "safety", "alertname": "harm-high", "monitor": "prod", "severity": "critical"}
    events = [e for e in store.alert_events("prod") if e["rule"] == "harm-high"][::-1]
    assert [(e["state"], e["run_id"], e["value"]) for e in events] == [
        ("pending", 7, 2e-3), ("firing", 8, 3e-3), ("resolved", 9, 4e-4)]
    assert events[1]["threshold"] == 1e-3 and events[1]["severity"] == "critical"
    assert "prod/harm-high firing: harm_probability_upper_bound = 0.003 > 0.001" == events[1]["message"]
    # The log sink (always there) got the firing and the resolution; both deliveries recorded.
    deliveries = store.alert_deliveries(rule="harm-high")[::-1]
    assert [(d["sink"], d["status"], d["outcome"]) for d in deliveries] == [
        ("log", "firing", "delivered"), ("log", "resolved", "delivered")]
    assert deliveries[0]["event_id"] == events[1]["id"]
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("alert prod/harm-high pending") for line in lines)
    assert any(line.startswith("ALERT FIRING [critical] prod/harm-high firing") for line in lines)


def test_a_restarted_engine_does_not_resend_before_the_repeat_interval(store):
    rules = [{**HARM_HIGH, "for": 1}]
    first, _ = service_for(store, rules)
    now = datetime.now(timezone.utc)
    first.on_run("prod", "succeeded", figures(ci_high=2e-3), now=now)
    first.close(5)
    assert len(store.alert_deliveries(rule="harm-high")) == 1

    # The daemon restarts: a new service, new metrics, the same database.
    second, metrics = service_for(store, rules)
    second.restore()
    assert metrics.registry.get_sample_value(
        "tailmon_alert_state", {"monitor": "prod", "rule": "harm-high", "severity": "critical"}) == 2
    assert second.on_run("prod", "succeeded", figures(ci_high=2e-3), now=now + HOUR) == ["harm-high"]
    assert second.on_run("prod", "succeeded", figures(ci_high=2e-3), now=now + 3 * HOUR) == ["harm-high"]
    second.close(5)
    assert len(store.alert_deliveries(rule="harm-high")) == 1  # still only the first notification
    third, _ = service_for(store, rules)
    third.on_run("prod", "succeeded", figures(ci_high=2e-3), now=now + 4 * HOUR)
    third.close(5)
    deliveries = store.alert_deliveries(rule="harm-high")
    assert [(d["status"], d["repeat"]) for d in deliveries] == [("firing", True), ("firing", False)]
    assert [e["state"] for e in store.alert_events("prod") if e["rule"] == "harm-high"] == ["firing"]


def test_unreliable_estimates_are_an_alert_of_their_own(store, caplog):
    service, _ = service_for(store, [])
    now = datetime.now(timezone.utc)
    with caplog.at_level(logging.WARNING, logger="tailmon.alerts"):
        # One unreliable run fires at once (for: 1 by default): a doubtful estimate never passes.
        assert service.on_run("prod", "succeeded", figures(reliable=False), now=now) == ["unreliable-estimate"]
        assert store.get_alert_state("prod", "unreliable-estimate")["state"] == "firing"
        service.close(5)
    assert any("ALERT FIRING [warning] prod/unreliable-estimate" in r.getMessage() for r in caplog.records)


def test_run_failure_rule(store):
    service, _ = service_for(store, [{"name": "run-failed", "metric": "run_failed", "op": ">=", "threshold": 1}])
    now = datetime.now(timezone.utc)
    assert service.on_run("prod", "failed", None, now=now) == ["run-failed"]
    assert service.on_run("prod", "interrupted", None, now=now + HOUR) == ["run-failed"]  # no evidence either way
    assert service.on_run("prod", "succeeded", figures(), now=now + 2 * HOUR) == []
    service.close(5)
    assert [e["state"] for e in store.alert_events("prod") if e["rule"] == "run-failed"] == ["resolved", "firing"]


STALE = {"name": "stale", "metric": "seconds_since_success", "op": ">", "threshold": "2h"}


def _succeed(store, monitor="prod"):
    run_id = store.start_run(monitor, model_ref="m", model_version=1, config_hash="c", settings={})
    store.finish_run(run_id, "succeeded", report=report())
    return store.get_run(run_id)["finished_at"]


def test_staleness_with_an_injected_clock(store):
    service, metrics = service_for(store, [STALE])
    finished = _succeed(store)
    service.tick(now=finished + HOUR)
    assert store.get_alert_state("prod", "stale")["state"] == "inactive"
    service.tick(now=finished + 2 * HOUR + timedelta(seconds=1))
    state = store.get_alert_state("prod", "stale")
    assert state["state"] == "firing" and state["last_value"] == pytest.approx(7201)
    assert metrics.registry.get_sample_value(
        "tailmon_alert_state", {"monitor": "prod", "rule": "stale", "severity": "warning"}) == 2
    # A new success: the run's own evaluation resolves it at once.
    later = _succeed(store)
    service.on_run("prod", "succeeded", figures(), now=later + timedelta(seconds=5))
    assert store.get_alert_state("prod", "stale")["state"] == "resolved"
    service.close(5)


def test_a_monitor_that_never_succeeded_is_stale_from_the_engine_start(store):
    service, _ = service_for(store, [STALE])
    service.tick(now=service.started + HOUR)
    assert store.get_alert_state("prod", "stale")["state"] == "inactive"
    service.tick(now=service.started + 3 * HOUR)
    assert store.get_alert_state("prod", "stale")["state"] == "firing"
    service.close(5)


def test_only_the_configured_rules_count_as_firing(store):
    service, _ = service_for(store, [{**HARM_HIGH, "for": 1}])
    store.set_alert_state("prod", "removed-rule", state="firing")  # from an older config
    assert service.on_run("prod", "succeeded", figures(ci_high=2e-3)) == ["harm-high"]
    service.close(5)
