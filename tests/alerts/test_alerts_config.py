"""Alert rules and sinks in the config: every mistake is one line naming the file and the key."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from alerts_support import MONITOR
from tailmon.cli.main import main
from tailmon.monitor.config import EXAMPLE, ConfigError, parse_config

RULE = {"name": "harm-high", "metric": "harm_probability", "op": ">", "threshold": 1e-3}


def config_text(alerts=(), sinks=None) -> str:
    return yaml.safe_dump({"alert_sinks": sinks or {}, "monitors": [{**MONITOR, "alerts": list(alerts)}]})


@pytest.mark.parametrize("alerts,expected", [
    ([{**RULE, "metric": "harm_probabilty"}],
     "t.yaml: monitors[0].alerts[0].metric: unknown metric 'harm_probabilty'; known: harm_probability, "),
    ([{**RULE, "sinks": ["pager"]}], "t.yaml: monitors[0].alerts[0].sinks: unknown sink 'pager' (configured: log)"),
    ([{**RULE, "metric": "expected_harmful_outputs", "window": "7d"}],
     "t.yaml: monitors[0].alerts[0].window: '7d' is not one of the monitor's volume.windows (1h, 1d)"),
    ([{**RULE, "metric": "expected_harmful_outputs"}],
     "t.yaml: monitors[0].alerts[0]: metric 'expected_harmful_outputs' is per window: give window"),
    ([{**RULE, "window": "1d"}], "t.yaml: monitors[0].alerts[0]: metric 'harm_probability' has no window"),
    ([{**RULE, "window": "1 day"}], "t.yaml: monitors[0].alerts[0].window: window must be a positive integer"),
    ([{**RULE, "resolve_threshold": 2e-3}],
     "t.yaml: monitors[0].alerts[0]: resolve_threshold (0.002) must be <= threshold (0.001) for op '>'"),
    ([{**RULE, "op": "<", "resolve_threshold": 1e-4}],
     "t.yaml: monitors[0].alerts[0]: resolve_threshold (0.0001) must be >= threshold (0.001) for op '<'"),
    ([{**RULE, "op": "=>"}], "t.yaml: monitors[0].alerts[0].op: "),
    ([{**RULE, "for": 0}], "t.yaml: monitors[0].alerts[0].for: Input should be greater than or equal to 1"),
    ([{k: v for k, v in RULE.items() if k != "threshold"}], "t.yaml: monitors[0].alerts[0]: rule 'harm-high' needs threshold"),
    ([{**RULE, "treshold": 2}], "t.yaml: monitors[0].alerts[0].treshold: unknown key (a typo?)"),
    ([{**RULE, "severity": "Critical"}], "t.yaml: monitors[0].alerts[0].severity: severity must be lower-case"),
    ([{**RULE, "labels": {"monitor": "x"}}], "t.yaml: monitors[0].alerts[0].labels: label 'monitor' is set by tailmon"),
    ([{**RULE, "labels": {"team-name": "x"}}], "t.yaml: monitors[0].alerts[0].labels: label name 'team-name' must"),
    ([{**RULE, "repeat_interval": "often"}], "t.yaml: monitors[0].alerts[0].repeat_interval: repeat_interval must"),
    ([RULE, RULE], "t.yaml: monitors[0].alerts: alert rule name 'harm-high' is used twice"),
    ([{**RULE, "metric": "seconds_since_success", "threshold": "soon"}],
     "t.yaml: monitors[0].alerts[0]: threshold must be seconds (a number > 0) or a duration"),
    ([{**RULE, "metric": "seconds_since_success", "threshold": "6h", "for": 2}],
     "t.yaml: monitors[0].alerts[0]: seconds_since_success is checked on a clock, not per run"),
    ([{"name": "unreliable-estimate", "metric": "pareto_khat", "threshold": 0.7}],
     "t.yaml: monitors[0].alerts[0]: the built-in rule 'unreliable-estimate' has a fixed condition"),
])
def test_rule_mistakes(alerts, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(config_text(alerts), "t.yaml")
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message


@pytest.mark.parametrize("sink,expected", [
    ({"type": "webhook", "url": "https://x", "secret_env": "TAILMON_TEST_UNSET_SECRET"},
     "t.yaml: alert_sinks.hook.secret_env: environment variable TAILMON_TEST_UNSET_SECRET (the webhook's HMAC "
     "secret) is not set or empty"),
    ({"type": "webhook"}, "t.yaml: alert_sinks.hook: sink type 'webhook' needs url"),
    ({"type": "webhook", "url": "ftp://user:pw@x"}, "t.yaml: alert_sinks.hook.url: url must be an http:// or https:// URL"),
    ({"type": "sms", "url": "https://x"}, "t.yaml: alert_sinks.hook.type: "),
    ({"type": "log", "url": "https://x"}, "t.yaml: alert_sinks.hook: sink type 'log' does not take url"),
    ({"type": "alertmanager", "url": "http://am:9093", "format": "slack"},
     "t.yaml: alert_sinks.hook: sink type 'alertmanager' does not take format"),
    ({"type": "webhook", "url": "https://x", "resend_interval": 5},
     "t.yaml: alert_sinks.hook: sink type 'webhook' does not take resend_interval"),
    ({"type": "webhook", "url": "https://x", "timeout": "fast"}, "t.yaml: alert_sinks.hook.timeout: timeout must be"),
    ({"type": "webhook", "url": "https://x", "retries": -1}, "t.yaml: alert_sinks.hook.retries: "),
    ({"type": "webhook", "url": "https://x", "format": "teams"}, "t.yaml: alert_sinks.hook.format: "),
])
def test_sink_mistakes(sink, expected, monkeypatch):
    monkeypatch.delenv("TAILMON_TEST_UNSET_SECRET", raising=False)
    with pytest.raises(ConfigError) as err:
        parse_config(config_text(sinks={"hook": sink}), "t.yaml")
    message = str(err.value)
    assert message.startswith(expected), message
    assert "pw" not in message  # URLs may hold credentials: never echoed


def test_sink_names():
    with pytest.raises(ConfigError, match=r"^t\.yaml: alert_sinks: sink name 'On Call' must be lower-case"):
        parse_config(config_text(sinks={"On Call": {"type": "log"}}), "t.yaml")
    with pytest.raises(ConfigError, match=r"^t\.yaml: alert_sinks: the sink name 'log' is reserved for the log"):
        parse_config(config_text(sinks={"log": {"type": "webhook", "url": "https://x"}}), "t.yaml")


def test_a_good_alerting_config(monkeypatch):
    monkeypatch.setenv("TAILMON_TEST_SECRET", "k")
    cfg = parse_config(config_text(
        [{**RULE, "resolve_threshold": 5e-4, "for": 3, "severity": "critical", "labels": {"team": "safety"},
          "sinks": ["hook", "log"]},
         {"name": "many", "metric": "expected_harmful_outputs_upper_bound", "window": "1d", "op": ">=",
          "threshold": 10},
         {"name": "stale", "metric": "seconds_since_success", "op": ">", "threshold": "18h"},
         {"name": "unreliable-estimate", "severity": "critical", "for": 1}],
        sinks={"hook": {"type": "webhook", "url": "https://hooks.example/x", "secret_env": "TAILMON_TEST_SECRET",
                        "format": "slack", "timeout": "5s", "backoff": 0.5},
               "am": {"type": "alertmanager", "url": "http://127.0.0.1:9093"}}), "t.yaml")
    rules = cfg.monitors[0].alerts
    assert [r.name for r in rules] == ["harm-high", "many", "stale", "unreliable-estimate"]
    assert rules[0].for_runs == 3 and rules[2].threshold == 18 * 3600
    hook = cfg.alert_sinks["hook"]
    assert (hook.timeout, hook.backoff, hook.retries, hook.secret()) == (5.0, 0.5, 3, b"k")
    assert cfg.alert_sinks["am"].resend_interval == 60.0


def test_alert_rules_do_not_change_the_monitors_fingerprint():
    """Runs record the config hash of the estimate; rules judge the estimate without changing it."""
    plain = parse_config(config_text(), "t.yaml").monitors[0]
    alerted = parse_config(config_text([RULE]), "t.yaml").monitors[0]
    assert plain.fingerprint() == alerted.fingerprint()


def test_example_config_has_alerts_and_validates(tmp_path):
    cfg = parse_config(EXAMPLE, "example")
    assert [r.name for r in cfg.monitors[0].alerts] == ["harm-high", "stale"]
    path = tmp_path / "bad.yaml"
    path.write_text(config_text([{**RULE, "sinks": ["pager"]}]))
    result = CliRunner().invoke(main, ["config", "validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {path}: monitors[0].alerts[0].sinks: unknown sink 'pager' (configured: log)"
