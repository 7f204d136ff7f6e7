"""The daemon as a process: systemd notify and watchdog, SIGTERM, SIGHUP, kill -9 and restart,
and a real Prometheus scraping it. Each test starts `tailmon run` on the tiny model."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tailmon.store import Store

from daemon_support import write_config  # noqa: E402  (tests/ is on sys.path under pytest)

TAILMON = str(Path(sys.executable).with_name("tailmon"))


class DaemonProcess:
    def __init__(self, config: Path, tmp_path: Path, *args: str, env: dict | None = None):
        full_env = {**os.environ, "TAILMON_STATE_DIR": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1",
                    "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen([TAILMON, "run", "--config", str(config), *args], env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for_line(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}; log:\n{''.join(self.lines)}")

    def metrics_port(self) -> int:
        return int(self.wait_for_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def wait_for_run(db_url: str, status: str, timeout: float = 120, monitor: str = "tiny") -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        store = Store(db_url).open()
        try:
            runs = store.list_runs(monitor=monitor, status=status, limit=1)
        finally:
            store.close()
        if runs:
            return runs[0]
        time.sleep(0.1)
    raise AssertionError(f"no {status} run within {timeout} s")


@pytest.fixture
def slow_config(tmp_path, tiny_model_dir):
    """A run long enough (thousands of samples) to be caught in the middle."""
    return write_config(tmp_path, tiny_model_dir, samples=4000, model={
        "ref": str(tiny_model_dir), "max_new_tokens": 8, "batch_size": 64})


def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'tailmon.db'}"


def test_kill_9_during_a_run_then_restart(tmp_path, slow_config, tiny_model_dir):
    d = DaemonProcess(slow_config, tmp_path, "--once")
    try:
        running = wait_for_run(sqlite_url(tmp_path), "running")
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=30)
    finally:
        d.stop()
    # The same instance restarts (same host, new process): its dead predecessor's run is
    # interrupted at once, without waiting for the heartbeat to go stale; the next run succeeds.
    # (20 samples give an unreliable estimate, whose alert would make --once exit 1: not the point here.)
    quick = write_config(tmp_path, tiny_model_dir, samples=20, alerts=[{"name": "unreliable-estimate", "enabled": False}])
    done = subprocess.run([TAILMON, "run", "--config", str(quick), "--once", "--format", "json"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [outcome] = json.loads(done.stdout)
    store = Store(sqlite_url(tmp_path)).open()
    try:
        old = store.get_run(running["id"])
        assert old["status"] == "interrupted"
        assert old["report"] is None and old["estimates"] == []  # nothing half-written
        assert store.get_run(outcome["run_id"])["status"] == "succeeded"
        assert len(store.list_runs(limit=10)) == 2  # nothing else changed
    finally:
        store.close()


def test_notify_watchdog_and_sigterm(tmp_path, slow_config):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(60)
    cfg = yaml.safe_load(slow_config.read_text())
    cfg["shutdown_timeout"] = "2s"
    slow_config.write_text(yaml.safe_dump(cfg))
    d = DaemonProcess(slow_config, tmp_path, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"})
    try:
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        running = wait_for_run(sqlite_url(tmp_path), "running")
        t0 = time.time()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
        # Stopped within the shutdown bound (2 s) plus process teardown.
        assert time.time() - t0 < 15
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
    finally:
        d.stop()
        sock.close()
    store = Store(sqlite_url(tmp_path)).open()
    try:
        assert store.get_run(running["id"])["status"] == "interrupted"
    finally:
        store.close()
    d._reader.join(timeout=10)
    log = "".join(d.lines)
    # the log says what happened to the run, and no spurious error follows it (issue 18, item 17)
    assert f"run {running['id']} interrupted" in log
    assert "ERROR" not in log, log


@pytest.mark.parametrize("ref,says", [
    ("smollm2-135m-instruct", "tailmon models pull smollm2-135m-instruct"),  # the unit's case: never pulled
    ("no-such-model-folder", "no such file or directory"),
], ids=["embedded-not-pulled", "no-such-folder"])
def test_a_model_that_does_not_load_sends_no_ready_and_exits_3(tmp_path, tiny_model_dir, ref, says):
    """READY tells systemd the service works; a monitor whose model cannot load would fail every
    run, so the start fails instead: no READY=1, one line naming monitor and model, exit 3."""
    if os.sep not in ref and "-folder" in ref:
        ref = str(tmp_path / ref)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    cfg = write_config(tmp_path, tiny_model_dir, model={"ref": ref, "max_new_tokens": 3})
    d = DaemonProcess(cfg, tmp_path, env={"NOTIFY_SOCKET": sock_path, "TAILMON_CACHE_DIR": str(tmp_path / "cache")})
    messages = []
    try:
        # Until the process exits or says READY (the defect: then it would run on, so stop there).
        sock.settimeout(0.2)
        deadline = time.time() + 120
        while d.proc.poll() is None and time.time() < deadline and not any("READY=1" in m for m in messages):
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
        sock.setblocking(False)
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
        assert not any("READY=1" in m for m in messages), messages
        code = d.proc.wait(timeout=30)
        d._reader.join(timeout=10)
    finally:
        d.stop()
        sock.close()
    assert code == 3, "".join(d.lines)
    assert any(m.startswith("STATUS=not started: monitor tiny") for m in messages), messages
    last = d.lines[-1]
    assert last.startswith("runtime failure: monitor tiny: model ") and says in last, d.lines
    assert "Traceback" not in "".join(d.lines)


def test_sighup_reloads_and_a_bad_config_is_refused(tmp_path, tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir, samples=10)
    d = DaemonProcess(path, tmp_path)
    try:
        port = d.metrics_port()
        wait_for_run(sqlite_url(tmp_path), "succeeded")
        good = path.read_text()
        path.write_text("monitors: [oops")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_line(r"config reload refused")
        cfg = yaml.safe_load(good)
        second = dict(cfg["monitors"][0], name="tiny-two")
        cfg["monitors"].append(second)
        path.write_text(yaml.safe_dump(cfg))
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_line(r"config reloaded .*tiny, tiny-two")
        wait_for_run(sqlite_url(tmp_path), "succeeded", monitor="tiny-two")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'tailmon_runs_total{monitor="tiny-two",status="succeeded"}' in body
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
    finally:
        d.stop()


PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


@pytest.fixture
def prometheus_binaries():
    if PROMETHEUS and PROMTOOL:
        return PROMETHEUS, PROMTOOL
    if os.environ.get("TAILMON_REQUIRE_PROMETHEUS") == "1":
        pytest.fail("TAILMON_REQUIRE_PROMETHEUS=1 but prometheus/promtool are not installed")
    pytest.skip("prometheus not installed (apt-get install prometheus)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_scrapes_the_daemon(tmp_path, tiny_model_dir, prometheus_binaries):
    prometheus, promtool = prometheus_binaries
    path = write_config(tmp_path, tiny_model_dir, samples=20)
    d = DaemonProcess(path, tmp_path)
    prom = None
    try:
        port = d.metrics_port()
        run = wait_for_run(sqlite_url(tmp_path), "succeeded")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr

        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "tailmon", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        }))
        prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        query = urllib.parse.urlencode({"query": 'tailmon_harm_probability{monitor="tiny"}'})
        deadline = time.time() + 60
        result = []
        while time.time() < deadline and not result:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/query?{query}", timeout=5) as r:
                    result = json.load(r)["data"]["result"]
            except OSError:
                pass  # Prometheus still starting
            time.sleep(0.5)
        assert result, "Prometheus never returned the series"
        assert float(result[0]["value"][1]) == pytest.approx(run["p_hat"], rel=1e-9)
        assert result[0]["metric"]["job"] == "tailmon"
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        d.proc.send_signal(signal.SIGTERM)
        d.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_run_once_exits_130_and_records_the_run_interrupted(tmp_path, slow_config, sig):
    # Before: Ctrl-C exited 1 (the code of a failed gate or a firing alert) and both signals left
    # the run 'running' until the next start cleaned it up.
    d = DaemonProcess(slow_config, tmp_path, "--once")
    try:
        running = wait_for_run(sqlite_url(tmp_path), "running")
        time.sleep(0.5)  # inside the estimation, past the store's writes
        d.proc.send_signal(sig)
        code = d.proc.wait(timeout=60)
    finally:
        d.stop()
    d._reader.join(timeout=10)
    assert code == 130, "".join(d.lines)[-3000:]  # the log says where the signal landed
    assert "interrupted" in "".join(d.lines) and "Traceback" not in "".join(d.lines)
    store = Store(sqlite_url(tmp_path)).open()
    try:
        run = store.get_run(running["id"])
    finally:
        store.close()
    assert run["status"] == "interrupted" and "signal" in run["error"]
    assert run["report"] is None and run["estimates"] == []


def test_run_once_on_a_monitor_another_process_holds_exits_3_naming_the_holder(tmp_path, tiny_model_dir):
    # Before: exit 0 with nothing run, and 'run None' in the output.
    config = write_config(tmp_path, tiny_model_dir)
    holder = Store(sqlite_url(tmp_path), instance_id="gpu-box-7").open()
    try:
        assert holder.try_lock("tiny")
        done = subprocess.run([TAILMON, "run", "--config", str(config), "--once"],
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.close()
    assert done.returncode == 3, done.stderr
    assert "gpu-box-7" in done.stderr and "another process holds its lock" in done.stderr
    assert "None" not in done.stdout + done.stderr
