"""The daemon as a process (`tailmon run`): alert gauges restored from the store at start, the
serve loop's staleness check notifying a real webhook receiver, deliveries recorded by SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from daemon_support import write_config
from tailmon.store import Store

TAILMON = str(Path(sys.executable).with_name("tailmon"))


def _wait_for(proc, lines, pattern, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if line:
            lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        elif proc.poll() is not None:
            break
    raise AssertionError(f"no log line matching {pattern!r}; log:\n{''.join(lines)}")


def test_serve_restores_gauges_checks_staleness_and_flushes_at_stop(tmp_path, tiny_model_dir, receiver):
    hook = receiver(secret=b"svc-secret")
    cfg = write_config(
        tmp_path, tiny_model_dir,
        schedule={"cron": "0 0 1 1 *"},  # no run during the test: staleness counts from the start
        alerts=[{"name": "stale", "metric": "seconds_since_success", "op": ">", "threshold": 0.001,
                 "sinks": ["hook"]},
                {"name": "harm-high", "metric": "harm_probability", "op": ">", "threshold": 0.5,
                 "severity": "critical"}],
        alert_sinks={"hook": {"type": "webhook", "url": hook.url, "secret_env": "TAILMON_TEST_SVC_SECRET"}})
    url = f"sqlite:///{tmp_path / 'tailmon.db'}"
    with Store(url) as store:  # what a previous daemon left: harm-high firing
        now = datetime.now(timezone.utc)
        store.set_alert_state("tiny", "harm-high", state="firing", consecutive=1, since=now, last_notified=now)

    env = {**os.environ, "TAILMON_STATE_DIR": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TAILMON_TEST_SVC_SECRET": "svc-secret"}
    proc = subprocess.Popen([TAILMON, "run", "--config", str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        port = int(_wait_for(proc, lines, r"metrics on http://127\.0\.0\.1:(\d+)/metrics", 120).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            exposition = response.read().decode()
        assert 'tailmon_alert_state{monitor="tiny",rule="harm-high",severity="critical"} 2.0' in exposition
        assert 'tailmon_alert_state{monitor="tiny",rule="stale",severity="warning"} 0.0' in exposition

        # The loop checks staleness as soon as it runs; the monitor has not succeeded since the start.
        _wait_for(proc, lines, r"tailmon daemon ready", 120)
        [request] = hook.wait_for(1, timeout=60)
        body = request.json()
        assert request.signature_ok and (body["rule"], body["status"]) == ("stale", "firing")
        assert body["value"] > 0.001
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(lines) + proc.stderr.read()
    with Store(url) as store:
        assert store.get_alert_state("tiny", "stale")["state"] == "firing"
        [delivery] = store.alert_deliveries(rule="stale")
        assert (delivery["sink"], delivery["outcome"], delivery["http_status"]) == ("hook", "delivered", 200)
        assert store.get_alert_state("tiny", "harm-high")["state"] == "firing"  # no run: untouched
