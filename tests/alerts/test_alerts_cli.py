"""`tailmon alerts list` over a real SQLite store and `tailmon alerts test` to a real receiver."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import yaml
from click.testing import CliRunner

from tailmon.cli.main import main
from tailmon.store import Store

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def db(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'alerts.db'}"
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    monkeypatch.setenv("TAILMON_DATABASE_URL", url)
    with Store(url) as store:
        store.set_alert_state("prod", "harm-high", state="firing", consecutive=2, since=T0, last_notified=T0,
                              last_value=2.5e-3, labels={"severity": "critical"})
        store.set_alert_state("prod", "unreliable-estimate", state="pending", consecutive=1, since=T0,
                              labels={"severity": "warning"})
        store.set_alert_state("staging", "harm-high", state="resolved", since=T0, labels={"severity": "critical"})
    return url


def test_list_table_and_filters(db):
    result = CliRunner().invoke(main, ["alerts", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:6] == ["monitor", "rule", "state", "severity", "since", "value"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["prod", "harm-high", "firing", "critical"], ["prod", "unreliable-estimate", "pending", "warning"],
        ["staging", "harm-high", "resolved", "critical"]]
    assert "0.0025" in lines[1]

    firing = CliRunner().invoke(main, ["alerts", "list", "--state", "firing"])
    assert [line.split()[:2] for line in firing.output.splitlines()[1:]] == [["prod", "harm-high"]]
    staging = CliRunner().invoke(main, ["alerts", "list", "--monitor", "staging", "--format", "json"])
    [row] = json.loads(staging.output)
    assert (row["monitor"], row["rule"], row["state"], row["since"]) == ("staging", "harm-high", "resolved",
                                                                           T0.isoformat())
    none = CliRunner().invoke(main, ["alerts", "list", "--state", "pending", "--monitor", "staging"])
    assert none.exit_code == 0 and none.output.strip() == "no alerts in state pending"
    bad = CliRunner().invoke(main, ["alerts", "list", "--state", "burning"])
    assert bad.exit_code == 2


def _config(tmp_path, sinks, monitors=("prod",), alerts=()):
    mons = [{"name": m, "prompts": {"type": "file", "path": "p.jsonl"}, "judge": "prefix:Sure",
             "proposals": ["system:x"], "schedule": {"every": "1h"}, "alerts": list(alerts)} for m in monitors]
    path = tmp_path / "tailmon.yaml"
    path.write_text(yaml.safe_dump({"database": f"sqlite:///{tmp_path / 'cfg.db'}", "alert_sinks": sinks,
                                    "monitors": mons}))
    return str(path)


def test_test_sink_reaches_the_receiver(tmp_path, receiver, monkeypatch):
    monkeypatch.setenv("TAILMON_TEST_CLI_SECRET", "k")
    hook = receiver(secret=b"k")
    cfg = _config(tmp_path, {"hook": {"type": "webhook", "url": hook.url, "secret_env": "TAILMON_TEST_CLI_SECRET"}})
    result = CliRunner().invoke(main, ["alerts", "test", "--sink", "hook", "--config", cfg])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "hook: delivered (HTTP 200) after 1 attempt(s)"
    [request] = hook.requests
    body = request.json()
    assert request.signature_ok and body["test"] is True and body["labels"]["tailmon_test"] == "true"
    # Nothing was evaluated or recorded.
    with Store(f"sqlite:///{tmp_path / 'cfg.db'}") as store:
        assert store.alert_states() == [] and store.alert_deliveries() == []


def test_test_rule_goes_through_its_sinks_and_a_failure_exits_3(tmp_path, receiver):
    good, bad = receiver(), receiver(fail_first=100, fail_status=503)
    rule = {"name": "harm-high", "metric": "harm_probability", "op": ">", "threshold": 0.01, "sinks": ["good", "bad"]}
    cfg = _config(tmp_path, {"good": {"type": "webhook", "url": good.url, "format": "slack"},
                             "bad": {"type": "webhook", "url": bad.url, "retries": 1, "backoff": 0.05},
                             "unused": {"type": "webhook", "url": good.url + "/unused"}}, alerts=[rule])
    result = CliRunner().invoke(main, ["alerts", "test", "harm-high", "--config", cfg])
    assert result.exit_code == 3
    assert "good: delivered (HTTP 200) after 1 attempt(s)" in result.stdout
    assert "bad: failed (HTTP 503) after 2 attempt(s): HTTP 503" in result.stdout
    assert "did not reach sink(s) bad" in result.stderr
    [request] = good.requests  # the rule's sinks only: not `unused`, not the log
    assert request.path == "/hook" and request.json()["text"].startswith("[TEST] warning: prod/harm-high test")
    assert len(bad.requests) == 2


def test_test_usage_errors(tmp_path):
    cfg = _config(tmp_path, {}, monitors=("prod", "staging"))
    runner = CliRunner()
    cases = [
        (["alerts", "test", "--config", cfg], "give a RULE or --sink NAME"),
        (["alerts", "test", "x", "--sink", "log", "--config", cfg], "give a RULE or --sink NAME"),
        (["alerts", "test", "--sink", "pager", "--config", cfg], "no sink named 'pager' (configured: log)"),
        (["alerts", "test", "nope", "--config", cfg], "no enabled alert rule named 'nope' in any monitor"),
        # The built-in rule is in both monitors.
        (["alerts", "test", "unreliable-estimate", "--config", cfg], "is in monitors prod, staging: pass --monitor"),
        (["alerts", "test", "--sink", "log"], "needs the config"),
    ]
    for args, expected in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and expected in result.stderr, (args, result.output)
    ok = runner.invoke(main, ["alerts", "test", "unreliable-estimate", "--monitor", "staging", "--config", cfg])
    assert ok.exit_code == 0 and ok.output.strip() == "log: delivered after 1 attempt(s)"


def test_list_names_the_sinks_that_have_not_taken_the_last_notification(db):
    """Catches `alerts list` presenting an alert as notified (its last_notified) while a sink never
    took it (issue 18, item 7)."""
    with Store(db) as store:
        for sink in ("hook", "log"):
            nid = store.add_alert_notification(monitor="prod", rule="harm-high", sink=sink, status="firing",
                                               payload={}, next_attempt_at=T0)
            store.alert_notification_attempted(nid, state="delivered" if sink == "log" else "pending")
    result = CliRunner().invoke(main, ["alerts", "list"])
    harm = result.output.splitlines()[1]
    assert harm.endswith("not delivered: hook (firing, pending after 1 attempt(s))"), harm
    assert "not delivered" not in result.output.splitlines()[2]
    rows = json.loads(CliRunner().invoke(main, ["alerts", "list", "--format", "json"]).output)
    sinks = rows[0]["sinks"]
    assert {name: (s["state"], s["attempts"]) for name, s in sinks.items()} == {"hook": ("pending", 1),
                                                                                "log": ("delivered", 1)}
    assert rows[1]["sinks"] == {}
