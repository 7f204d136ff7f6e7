"""config/alertmanager.example.yml: Alertmanager accepts it (`amtool check-config`) and routes the
labels tailmon really sends, from its alertmanager sink and from the Prometheus rules, to the
intended receiver (`amtool config routes test`).

Skipped when amtool is missing, unless TAILMON_REQUIRE_ALERTMANAGER=1 (CI), which fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from alerts_support import figures, make_config
from tailmon.alerts import AlertService

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
EXAMPLE = CONFIG_DIR / "alertmanager.example.yml"
RULES = CONFIG_DIR / "prometheus" / "tailmon-rules.yml"
REQUIRE_ENV = "TAILMON_REQUIRE_ALERTMANAGER"


@pytest.fixture(scope="module")
def amtool() -> str:
    found = os.environ.get("TAILMON_AMTOOL") or shutil.which("amtool")
    if not found:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but there is no amtool (apt-get install prometheus-alertmanager)")
        pytest.skip("amtool is not installed")
    return found


def routed_to(amtool: str, labels: dict) -> str:
    """The receiver(s) Alertmanager would notify for an alert with `labels`, as amtool prints them."""
    done = subprocess.run([amtool, "config", "routes", "test", f"--config.file={EXAMPLE}",
                           *(f"{k}={v}" for k, v in sorted(labels.items()))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_check_config_passes(amtool):
    done = subprocess.run([amtool, "check-config", str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_tailmon_routes_group_by_monitor_and_alertname():
    doc = yaml.safe_load(EXAMPLE.read_text())
    routes = doc["route"]["routes"]
    assert routes, "no tailmon route"
    for route in routes:
        assert set(route["group_by"]) == {"monitor", "alertname"}, route


@pytest.mark.parametrize("severity,expected", [("critical", "tailmon-oncall"), ("warning", "tailmon-webhook")])
def test_the_sinks_alerts_reach_the_intended_receiver(amtool, receiver, store, severity, expected):
    """The labels are the ones tailmon's alertmanager sink posts, read off the wire."""
    fake_am = receiver()
    base = fake_am.url.rsplit("/", 1)[0]
    rule = {"name": "harm-high", "metric": "harm_probability_upper_bound", "op": ">", "threshold": 1e-3,
            "severity": severity, "labels": {"team": "safety"}, "sinks": ["am"]}
    service = AlertService(make_config([rule], sinks={"am": {"type": "alertmanager", "url": base}}), store)
    try:
        assert service.on_run("prod", "succeeded", figures(ci_high=3e-3)) == ["harm-high"]
        assert service.flush(10)
    finally:
        service.close(5)
    [alert] = fake_am.wait_for(1)[0].json()
    assert {"alertname", "monitor", "severity"} <= set(alert["labels"])
    assert routed_to(amtool, alert["labels"]) == expected


def _rule_alerts():
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


@pytest.mark.parametrize("rule", _rule_alerts(), ids=lambda r: r["alert"])
def test_the_prometheus_rules_alerts_reach_the_intended_receiver(amtool, rule):
    labels = {"alertname": rule["alert"], **rule["labels"], "job": "tailmon"}
    if rule["alert"] != "TailmonExporterAbsent":  # absent() has no monitor to keep
        labels |= {"monitor": "prod", "instance": "127.0.0.1:9477"}
    want = {"critical": "tailmon-oncall", "warning": "tailmon-webhook"}[labels["severity"]]
    assert routed_to(amtool, labels) == want


def test_other_alerts_keep_the_default_route(amtool):
    assert routed_to(amtool, {"alertname": "NodeDown", "severity": "critical", "job": "node"}) == "default"
