"""Where an interval monitor's next run goes after a start or a reload (issue 18, item 15): one
interval after the start of its last stored run, on a real SQLite store and the real scheduler."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import CollectorRegistry

from tailmon.monitor.config import load_config
from tailmon.monitor.daemon import Daemon
from tailmon.monitor.metrics import Metrics
from tailmon.store import Store
from tailmon.store.schema import RUNS

from daemon_support import write_config  # noqa: E402  (tests/ is on sys.path)

HOUR = 3600.0
# The daemon reads the clock a moment after the test does; a few seconds cover a loaded machine.
SLACK_S = 30.0


def _store_run(url, status: str, started_ago_s: float, report) -> int:
    """A run of monitor 'tiny' ended with `status`, started `started_ago_s` seconds ago."""
    store = Store(url, instance_id="earlier").open()
    try:
        run_id = store.start_run("tiny", model_ref="m", model_version=1, config_hash="h", settings={})
        if status == "succeeded":
            store.finish_run(run_id, status, report=report)
        elif status != "running":
            store.finish_run(run_id, status, error="test")
        with store.engine.begin() as conn:
            conn.execute(RUNS.update().where(RUNS.c.id == run_id).values(
                started_at=datetime.now(timezone.utc) - timedelta(seconds=started_ago_s)))
        return run_id
    finally:
        store.close()


@pytest.fixture
def daemon_on(tmp_path, tiny_model_dir, build_report):
    daemons = []
    report, _ = build_report(["a b"])

    def start(runs):
        path = write_config(tmp_path, tiny_model_dir)  # every: 1h
        url = f"sqlite:///{tmp_path / 'tailmon.db'}"
        Store(url).open().close()  # the schema, before the runs go in
        for status, ago in runs:
            _store_run(url, status, ago, report)
        daemon = Daemon(load_config(path), metrics=Metrics(CollectorRegistry()))
        daemons.append(daemon)
        daemon.start()
        return daemon, url

    yield start
    for d in daemons:
        d.shutdown()


def _next_run(daemon) -> datetime:
    return daemon._scheduler.get_job("tiny").next_run_time


def test_a_restart_soon_after_a_run_waits_the_rest_of_the_interval(daemon_on):
    """Catches the interval restarting from now at a start or a reload (the next run 1 h after
    the restart instead of 10 min) and an interrupted run taken as the anchor."""
    # The last real run started 50 min ago and failed; a later one was cut off by the restart.
    daemon, _ = daemon_on([("succeeded", 5 * HOUR), ("failed", 50 * 60), ("interrupted", 60)])
    expected = datetime.now(timezone.utc) + timedelta(minutes=10)
    assert abs((_next_run(daemon) - expected).total_seconds()) < SLACK_S
    daemon.reload()  # SIGHUP: the same anchor, not a new interval from now
    assert abs((_next_run(daemon) - expected).total_seconds()) < SLACK_S


def test_a_run_in_progress_anchors_the_next_one(daemon_on):
    """Catches a reload during a run scheduling a second run at once (the running run ignored)."""
    daemon, _ = daemon_on([("succeeded", 3 * HOUR), ("running", 20 * 60)])
    expected = datetime.now(timezone.utc) + timedelta(minutes=40)
    assert abs((_next_run(daemon) - expected).total_seconds()) < SLACK_S


def test_a_restart_long_after_the_last_run_catches_up_once(daemon_on):
    """Catches a missed interval not run at once (the trigger's own next slot, up to an interval
    away), and several catch-up runs where one is due."""
    daemon, url = daemon_on([("succeeded", 5.5 * HOUR)])
    deadline = time.time() + 120
    ran = []
    while time.time() < deadline and not ran:
        store = Store(url).open()
        try:
            ran = [r for r in store.list_runs(monitor="tiny", limit=10) if r["status"] == "succeeded"
                   and r["started_at"] > datetime.now(timezone.utc) - timedelta(minutes=10)]
        finally:
            store.close()
        time.sleep(0.2)
    assert len(ran) == 1, "no catch-up run within 120 s"
    # Then the interval goes on from the catch-up run: nothing more is due for an hour.
    time.sleep(1.0)
    store = Store(url).open()
    try:
        assert len(store.list_runs(monitor="tiny", limit=10)) == 2
    finally:
        store.close()
    nxt = _next_run(daemon)
    assert abs((nxt - (ran[0]["started_at"] + timedelta(hours=1))).total_seconds()) < SLACK_S
