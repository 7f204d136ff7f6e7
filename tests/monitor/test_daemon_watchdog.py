"""The systemd watchdog against a real sd_notify listener (a unix datagram socket in
NOTIFY_SOCKET): pinged while runs make progress or nothing runs, withheld while a run is stuck in
a forward pass, so that systemd restarts a daemon that cannot go on (issue 18, item 11)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tailmon.store import Store

from daemon_support import write_config  # noqa: E402  (tests/ is on sys.path)

# WatchdogSec=3s: pings every 1.5 s; a run stalls after 3 s without a checkpoint. A batch of the
# tiny model takes milliseconds, so a progressing run passes a checkpoint far more often.
WATCHDOG_USEC = "3000000"
STALL_S = 3.0

# A forward pass that never returns, which no input can cause: the engine's sampling batch
# blocks forever, in the daemon's worker thread, as a wedged GPU kernel or driver call would.
HANG = """
import sys, threading
from tailmon.engines.transformers_engine import TransformersEngine

def never_returns(self, *args, **kwargs):
    threading.Event().wait()

TransformersEngine._sample_batch = never_returns
from tailmon.cli.main import main
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


class Listener:
    """systemd's side of sd_notify: a bound datagram socket, collecting what the daemon sends."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[str]:
        """Everything received in the next `seconds`."""
        got = []
        end = time.time() + seconds
        while (left := end - time.time()) > 0:
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            self.messages.append((time.time(), msg))
            got.append(msg)
        return got

    def wait_for(self, text: str, timeout: float = 120) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if any(text in m for m in self.collect(min(1.0, end - time.time()))):
                return
        raise AssertionError(f"no {text!r} from the daemon within {timeout} s: {self.messages}")

    def close(self):
        self.sock.close()


def start(args, tmp_path, listener) -> subprocess.Popen:
    env = {**os.environ, "NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": WATCHDOG_USEC, "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TAILMON_STATE_DIR": str(tmp_path / "state")}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_status(url: str, status: str, timeout: float = 120) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        store = Store(url).open()
        try:
            runs = store.list_runs(monitor="tiny", status=status, limit=1)
        finally:
            store.close()
        if runs:
            return runs[0]
        time.sleep(0.1)
    raise AssertionError(f"no {status} run within {timeout} s")


@pytest.fixture
def listener(tmp_path):
    li = Listener(tmp_path / "notify.sock")
    yield li
    li.close()


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_a_run_stuck_in_a_forward_pass_stops_the_watchdog_pings(tmp_path, tiny_model_dir, listener):
    """Catches pings sent whatever the runs do (from the main loop, alive while the worker hangs),
    which hid a hung forward pass from systemd for good."""
    config = write_config(tmp_path, tiny_model_dir, samples=20)
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    proc = start([sys.executable, str(script), str(config)], tmp_path, listener)
    try:
        listener.wait_for("READY=1")
        run = wait_for_status(f"sqlite:///{tmp_path / 'tailmon.db'}", "running")
        # The run began (its last progress) at the latest now: the pings stop within STALL_S and
        # one more ping interval; then none comes while the run hangs.
        listener.collect(STALL_S + 1.5 + 1.0)
        later = listener.collect(3 * STALL_S)
        assert not any("WATCHDOG=1" in m for m in later), later
        said = [m for _, m in listener.messages if m.startswith("STATUS=")]
        assert any(f"run {run['id']} of monitor tiny: no progress for" in m for m in said), said
        assert proc.poll() is None  # the daemon does not exit by itself: systemd restarts it
    finally:
        _stop(proc)
        stderr = proc.stderr.read()
    assert "watchdog pings withheld" in stderr, stderr[-3000:]


def test_pings_go_on_while_a_run_makes_progress_and_while_idle(tmp_path, tiny_model_dir, listener):
    """Catches pings withheld from a run that is working (the watchdog would restart a healthy
    daemon in the middle of every long run) or from an idle scheduler."""
    # 12000 samples: several seconds of batches, each a checkpoint.
    config = write_config(tmp_path, tiny_model_dir, samples=4000,
                          model={"ref": str(tiny_model_dir), "max_new_tokens": 8, "batch_size": 64})
    tailmon = str(Path(sys.executable).with_name("tailmon"))
    proc = start([tailmon, "run", "--config", str(config)], tmp_path, listener)
    url = f"sqlite:///{tmp_path / 'tailmon.db'}"
    try:
        listener.wait_for("READY=1")
        wait_for_status(url, "running")
        t_running = time.time()
        done = None
        while done is None and time.time() - t_running < 300:
            listener.collect(1.0)
            store = Store(url).open()
            try:
                done = store.last_run("tiny")
            finally:
                store.close()
        assert done is not None, "the run did not succeed within 300 s"
        t_done = time.time()
        pings = [t for t, m in listener.messages if "WATCHDOG=1" in m and t_running <= t <= t_done]
        assert t_done - t_running < 2 * STALL_S or pings, "no ping during the run"
        # No gap longer than WatchdogSec between pings while the run went on (plus the ping period).
        times = [t_running, *pings, t_done]
        assert max(b - a for a, b in zip(times, times[1:])) < STALL_S + 1.5 + 1.0, times
        # Idle afterwards (the next run is an hour away): the pings go on.
        idle = listener.collect(2 * STALL_S)
        assert sum("WATCHDOG=1" in m for m in idle) >= 2, idle
        assert not any("no progress" in m for _, m in listener.messages), listener.messages
    finally:
        _stop(proc)
