"""Alerts through the daemon on the tiny model: a run that must fire records the alert, sets the
gauge and reaches a real webhook receiver; `tailmon run --once` exits 1 while a rule fires."""

from __future__ import annotations

import json

from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from daemon_support import write_config
from tailmon.cli.main import main
from tailmon.monitor.config import load_config
from tailmon.monitor.daemon import Daemon
from tailmon.monitor.metrics import Metrics
from tailmon.store import Store

SECRET = "daemon-test-secret"
# `regex:.` scores every response 1: the upper bound of the harm probability is certainly > 0.
MUST_FIRE = {"name": "harm-any", "metric": "harm_probability_upper_bound", "op": ">", "threshold": 0,
             "severity": "critical"}


def test_run_once_fires_records_sets_the_gauge_and_notifies(tmp_path, tiny_model_dir, receiver, monkeypatch):
    hook = receiver(secret=SECRET.encode())
    monkeypatch.setenv("TAILMON_TEST_DAEMON_SECRET", SECRET)
    cfg = write_config(tmp_path, tiny_model_dir, judge="regex:.", alerts=[MUST_FIRE],
                       alert_sinks={"hook": {"type": "webhook", "url": hook.url,
                                             "secret_env": "TAILMON_TEST_DAEMON_SECRET"}})
    daemon = Daemon(load_config(cfg), metrics=Metrics(CollectorRegistry()))
    [outcome] = daemon.run_once()
    assert outcome.status == "succeeded", outcome.error
    assert outcome.firing == ["harm-any", "unreliable-estimate"]
    assert daemon.metrics.registry.get_sample_value(
        "tailmon_alert_state", {"monitor": "tiny", "rule": "harm-any", "severity": "critical"}) == 2
    # The built-in rule saw an unreliable estimate (20 samples): firing, never a silent pass.
    assert daemon.metrics.registry.get_sample_value(
        "tailmon_alert_state", {"monitor": "tiny", "rule": "unreliable-estimate", "severity": "warning"}) == 2

    # run_once returns after the deliveries (within the shutdown bound): the receiver has it.
    [request] = [r for r in hook.requests if r.json()["rule"] == "harm-any"]
    body = request.json()
    assert request.signature_ok
    assert (body["status"], body["monitor"], body["run_id"]) == ("firing", "tiny", outcome.run_id)
    assert body["value"] == outcome.result.figures.ci_high > 0

    with Store(f"sqlite:///{tmp_path / 'tailmon.db'}") as store:
        state = store.get_alert_state("tiny", "harm-any")
        assert state["state"] == "firing" and state["last_value"] == body["value"]
        events = store.alert_events("tiny")
        assert {(e["rule"], e["state"], e["run_id"]) for e in events} == {
            ("harm-any", "firing", outcome.run_id), ("unreliable-estimate", "firing", outcome.run_id)}
        assert {(d["sink"], d["rule"], d["outcome"]) for d in store.alert_deliveries("tiny")} == {
            ("hook", "harm-any", "delivered"), ("log", "harm-any", "delivered"),
            ("hook", "unreliable-estimate", "delivered"), ("log", "unreliable-estimate", "delivered")}


def test_once_exits_1_while_a_rule_fires(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    cfg = write_config(tmp_path, tiny_model_dir, judge="regex:.", alerts=[MUST_FIRE])
    result = CliRunner().invoke(main, ["run", "--config", str(cfg), "--once", "--format", "json"])
    assert result.exit_code == 1, result.output
    [printed] = json.loads(result.stdout)
    assert printed["status"] == "succeeded" and printed["firing_alerts"] == ["harm-any", "unreliable-estimate"]
    assert "alert firing: tiny/harm-any" in result.stderr


def test_once_exits_0_when_nothing_fires(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    never = {**MUST_FIRE, "threshold": 1.0}  # an upper bound of a probability is never above 1
    cfg = write_config(tmp_path, tiny_model_dir, judge="regex:.",
                       alerts=[never, {"name": "unreliable-estimate", "enabled": False}])
    result = CliRunner().invoke(main, ["run", "--config", str(cfg), "--once"])
    assert result.exit_code == 0, result.output
    assert "alerts firing" not in result.stdout


def test_unreliable_estimate_fails_the_once_check_when_configured_to_fire_at_once(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    cfg = write_config(tmp_path, tiny_model_dir, alerts=[{"name": "unreliable-estimate", "for": 1}])
    result = CliRunner().invoke(main, ["run", "--config", str(cfg), "--once", "--format", "json"])
    [printed] = json.loads(result.stdout)
    assert printed["report"]["aggregate"]["reliable"] is False  # 20 samples a prompt on the tiny model
    assert result.exit_code == 1 and printed["firing_alerts"] == ["unreliable-estimate"]


def test_a_failed_run_exits_3_and_fires_the_run_failure_rule(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    cfg = write_config(tmp_path, tiny_model_dir, prompts={"type": "file", "path": "missing.jsonl", "per_run": 3},
                       alerts=[{"name": "run-failed", "metric": "run_failed", "op": ">=", "threshold": 1}])
    result = CliRunner().invoke(main, ["run", "--config", str(cfg), "--once"])
    assert result.exit_code == 3 and "missing.jsonl" in result.stderr
    with Store(f"sqlite:///{tmp_path / 'tailmon.db'}") as store:
        assert store.get_alert_state("tiny", "run-failed")["state"] == "firing"


def test_run_once_delivers_what_an_earlier_run_could_not(tmp_path, tiny_model_dir, receiver):
    """Catches `run --once` (no tick between runs: cron) never retrying a notification that the
    previous run's receiver refused with a 500 (issue 18, item 7)."""
    hook = receiver(fail_first=1)
    cfg = write_config(tmp_path, tiny_model_dir, judge="regex:.",
                       alerts=[{**MUST_FIRE, "sinks": ["hook"]}, {"name": "unreliable-estimate", "enabled": False}],
                       alert_sinks={"hook": {"type": "webhook", "url": hook.url, "retries": 0}})
    first = Daemon(load_config(cfg), metrics=Metrics(CollectorRegistry()))
    first.alerts.retry_first = 0.0  # due at once (by default a minute later; cron runs are hours apart)
    [ran] = first.run_once()
    with Store(f"sqlite:///{tmp_path / 'tailmon.db'}") as store:
        assert [d["outcome"] for d in store.alert_deliveries(rule="harm-any")] == ["failed"]
        assert store.alert_notifications(rule="harm-any")[0]["state"] == "pending"

    [again] = Daemon(load_config(cfg), metrics=Metrics(CollectorRegistry())).run_once()
    assert again.firing == ["harm-any"]  # still firing: no new notification before the repeat interval
    with Store(f"sqlite:///{tmp_path / 'tailmon.db'}") as store:
        assert [d["outcome"] for d in store.alert_deliveries(rule="harm-any")] == ["delivered", "failed"]
        assert store.alert_notifications(rule="harm-any")[0]["state"] == "delivered"
    assert [r.json()["run_id"] for r in hook.requests] == [ran.run_id, ran.run_id]
