"""A real Alertmanager (Debian's prometheus-alertmanager) on loopback receives a firing alert from
tailmon's service and then its resolution; both are read back through Alertmanager's API v2.

Skipped when the binary is missing, unless TAILMON_REQUIRE_ALERTMANAGER=1 (CI), which fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

from alerts_support import figures, make_config
from tailmon.alerts import AlertService

BINARY_ENV = "TAILMON_ALERTMANAGER"
REQUIRE_ENV = "TAILMON_REQUIRE_ALERTMANAGER"
RULE = {"name": "harm-high", "metric": "harm_probability_upper_bound", "op": ">", "threshold": 1e-3,
        "resolve_threshold": 5e-4, "severity": "critical", "labels": {"team": "safety"},
        "annotations": {"runbook": "https://wiki.example/tailmon"}, "sinks": ["am"]}


def _binary() -> str:
    found = os.environ.get(BINARY_ENV) or shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if not found:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but there is no prometheus-alertmanager binary "
                        "(apt-get install prometheus-alertmanager)")
        pytest.skip("prometheus-alertmanager is not installed")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def alertmanager(tmp_path):
    """Base URL of a fresh Alertmanager: one route to a receiver that notifies nobody."""
    binary = _binary()
    config = tmp_path / "alertmanager.yml"
    config.write_text('route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n', encoding="utf-8")
    port = _free_port()
    log = open(tmp_path / "alertmanager.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.path={tmp_path / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"alertmanager did not start:\n{(tmp_path / 'alertmanager.log').read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _ours(url: str) -> list[dict]:
    return [a for a in _get(f"{url}/api/v2/alerts") if a["labels"].get("alertname") == "harm-high"]


def test_firing_then_resolved_through_alertmanager(alertmanager, store):
    service = AlertService(make_config([RULE], sinks={"am": {"type": "alertmanager", "url": alertmanager,
                                                            "resend_interval": 60}}), store)
    fired_at = datetime.now(timezone.utc).replace(microsecond=0)
    assert service.on_run("prod", "succeeded", figures(ci_high=3e-3), now=fired_at) == ["harm-high"]
    assert service.flush(10)

    [alert] = _ours(alertmanager)
    assert alert["labels"] == {"alertname": "harm-high", "monitor": "prod", "severity": "critical", "team": "safety"}
    assert alert["annotations"]["runbook"] == "https://wiki.example/tailmon"
    assert alert["annotations"]["summary"] == "prod/harm-high firing: harm_probability_upper_bound = 0.003 > 0.001"
    assert alert["annotations"]["value"] == "0.003"
    assert alert["status"]["state"] == "active"
    starts = datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00"))
    ends = datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00"))
    assert starts == fired_at
    assert ends == fired_at + timedelta(minutes=4)  # 4 x resend_interval: kept alive by re-sends

    # Still past the resolve threshold: stays firing (hysteresis), and Alertmanager agrees.
    service.on_run("prod", "succeeded", figures(ci_high=8e-4), now=fired_at + timedelta(seconds=1))
    assert service.flush(10)
    assert len(_ours(alertmanager)) == 1

    resolved_at = datetime.now(timezone.utc)
    service.on_run("prod", "succeeded", figures(ci_high=4e-4), now=resolved_at)
    assert service.flush(10)
    service.close(5)
    # endsAt = the resolution time, in the past: Alertmanager no longer lists the alert as active.
    assert _ours(alertmanager) == []
    deliveries = store.alert_deliveries(rule="harm-high")
    assert [(d["sink"], d["status"], d["outcome"], d["http_status"]) for d in deliveries] == [
        ("am", "resolved", "delivered", 200), ("am", "firing", "delivered", 200)]


def test_firing_alerts_are_kept_alive_by_the_tick(alertmanager, store):
    """Alertmanager drops an alert nobody re-sends; the service's clock re-sends firing ones."""
    service = AlertService(make_config([RULE], sinks={"am": {"type": "alertmanager", "url": alertmanager,
                                                            "resend_interval": 1}}), store)
    now = datetime.now(timezone.utc)
    service.on_run("prod", "succeeded", figures(ci_high=3e-3), now=now)
    assert service.flush(10)
    [first] = _ours(alertmanager)
    service.tick(now=now + timedelta(milliseconds=500))  # within the interval: nothing re-sent
    assert service.flush(10)
    assert _ours(alertmanager)[0]["endsAt"] == first["endsAt"]
    service.tick(now=now + timedelta(seconds=2))
    assert service.flush(10)
    service.close(5)
    [kept] = _ours(alertmanager)
    ends = lambda a: datetime.fromisoformat(a["endsAt"].replace("Z", "+00:00"))  # noqa: E731
    assert ends(kept) - ends(first) == timedelta(seconds=2)
    assert kept["startsAt"] == first["startsAt"]
    # Keep-alives are not notifications: only the firing one is recorded.
    assert [d["status"] for d in store.alert_deliveries(rule="harm-high")] == ["firing"]


def test_test_notification_is_kept_apart_from_the_real_alert(alertmanager, store):
    service = AlertService(make_config([RULE], sinks={"am": {"type": "alertmanager", "url": alertmanager}}), store)
    rule = service.rule("prod", "harm-high")
    [(name, delivery)] = service.send_now(service.test_notification("prod", rule), ["am"]).items()
    assert (name, delivery.outcome, delivery.http_status) == ("am", "delivered", 200)
    [alert] = _ours(alertmanager)
    assert alert["labels"]["tailmon_test"] == "true"
    assert store.alert_deliveries() == []  # a test changes nothing in the store


def test_a_stopped_daemons_alert_expires_in_alertmanager_and_a_restart_fires_it_again(alertmanager, store):
    """What the README says of a stop: nothing re-sends the firing alert, so Alertmanager lets it
    expire after 4 x resend_interval while the store (`tailmon alerts list`) still says firing; the
    restarted daemon's first tick sends it again with its original start."""
    sinks = {"am": {"type": "alertmanager", "url": alertmanager, "resend_interval": 1}}
    service = AlertService(make_config([RULE], sinks=sinks), store)
    fired_at = datetime.now(timezone.utc).replace(microsecond=0)
    service.on_run("prod", "succeeded", figures(ci_high=3e-3), now=fired_at)
    assert service.flush(10)
    [first] = _ours(alertmanager)
    service.close(5)  # the daemon stops
    deadline = time.time() + 15
    while _ours(alertmanager) and time.time() < deadline:
        time.sleep(0.2)
    assert _ours(alertmanager) == []
    assert [(s["rule"], s["state"]) for s in store.alert_states("firing")] == [("harm-high", "firing")]
    restarted = AlertService(make_config([RULE], sinks=sinks), store)
    restarted.tick()
    assert restarted.flush(10)
    restarted.close(5)
    [again] = _ours(alertmanager)
    assert again["startsAt"] == first["startsAt"]
