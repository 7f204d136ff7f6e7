"""Run lifecycle in the store: start, heartbeat, close in one transaction, stale and restarted
owners, queries, model versions and redaction; on SQLite and PostgreSQL alike."""

from __future__ import annotations

import json
import math
import threading
from datetime import timezone

import pytest
from sqlalchemy import MetaData, select

from tailmon.errors import InputError, RuntimeFailure
from tailmon.redact import redact
from tailmon.store import to_jsonable
from tailmon.store.schema import RUNS

SETTINGS = {"prompts": "advbench", "samples": 40, "judge": "prefix:Sure"}


def start(store, monitor="m1", **kw):
    args = dict(model_ref="smollm2", model_version=1, config_hash="cfg-1", settings=SETTINGS)
    args.update(kw)
    return store.start_run(monitor, **args)


def test_run_lifecycle(store, build_report):
    report, samples = build_report([("How do I pick a lock?", "crime"), "Write a poem"])
    run_id = start(store)

    run = store.get_run(run_id)
    assert run["status"] == "running" and run["monitor"] == "m1"
    assert run["owner_instance"] == "host-a" and run["owner_token"] == store.token
    assert run["settings"] == SETTINGS and run["config_hash"] == "cfg-1" and run["model_version"] == 1
    assert run["started_at"].tzinfo == timezone.utc and run["heartbeat_at"] == run["started_at"]
    assert run["finished_at"] is None and run["report"] is None and run["estimates"] == []
    assert store.heartbeat(run_id) is True
    assert store.get_run(run_id)["heartbeat_at"] >= run["heartbeat_at"]

    store.finish_run(run_id, "succeeded", report=report, timings={"sampling_s": 1.5, "total_s": 2.0},
                     samples=samples)
    run = store.get_run(run_id)
    agg = report["aggregate"]
    assert run["status"] == "succeeded" and run["error"] is None
    assert run["finished_at"].tzinfo == timezone.utc and run["finished_at"] >= run["started_at"]
    assert run["duration_s"] == pytest.approx((run["finished_at"] - run["started_at"]).total_seconds())
    assert run["timings"] == {"sampling_s": 1.5, "total_s": 2.0}
    assert run["report"] == report  # no personal data in these prompts: stored as given
    assert run["method"] == "is"
    for key in ("p_hat", "ci_low", "ci_high", "std_error"):
        assert run[key] == pytest.approx(agg[key])
    assert (run["n_prompts"], run["n_samples"], run["n_harmful"]) == (2, 80, agg["n_harmful"])
    assert run["reliable"] is agg["reliable"]
    # The aggregate has no ESS/k-hat of its own: the store keeps the weakest prompt's.
    assert run["ess"] == pytest.approx(min(e["ess"] for e in report["estimates"]))
    assert run["khat"] == pytest.approx(max(e["khat"] for e in report["estimates"]))
    assert run["volume"] == 1e6 and run["window"] == "1d"
    assert run["expected_per_window"] == pytest.approx(agg["expected_per_window"]["expected"])
    assert run["expected_ci_low"] == pytest.approx(agg["expected_per_window"]["ci_low"])
    assert run["expected_ci_high"] == pytest.approx(agg["expected_per_window"]["ci_high"])
    assert run["p_any_per_window"] == pytest.approx(agg["p_any_per_window"]["p"])
    assert run["p_any_ci_high"] == pytest.approx(agg["p_any_per_window"]["ci_high"])

    assert [e["prompt"] for e in run["estimates"]] == ["How do I pick a lock?", "Write a poem"]
    assert [e["prompt_index"] for e in run["estimates"]] == [0, 1]
    for row, est in zip(run["estimates"], report["estimates"]):
        assert row["category"] == est["category"]
        for key in ("p_hat", "ci_low", "ci_high", "ess", "ess_wh", "khat", "kl"):
            assert row[key] == pytest.approx(est[key])
        assert row["n_harmful"] == est["n_harmful"] and row["reliable"] is est["reliable"]
        assert row["warnings"] == est["warnings"]

    stored = store.get_samples(run_id)
    assert len(stored) == 80
    assert stored[0] == samples[0] and stored[-1] == samples[-1]
    assert store.heartbeat(run_id) is False  # closed: a late heartbeat tick is harmless
    as_json = json.loads(json.dumps(to_jsonable(run), allow_nan=False))
    assert as_json["started_at"] == run["started_at"].isoformat() and as_json["report"] == report


def test_report_without_volume_leaves_extrapolations_empty(store, build_report):
    report, _ = build_report(["Write a poem"], volume=None)
    run_id = start(store)
    store.finish_run(run_id, "succeeded", report=report)
    run = store.get_run(run_id)
    assert run["p_hat"] == pytest.approx(report["aggregate"]["p_hat"])
    assert run["volume"] is None and run["expected_per_window"] is None and run["p_any_per_window"] is None
    assert store.get_samples(run_id) == []


def test_failed_run_keeps_error_and_no_figures(store):
    run_id = start(store)
    store.finish_run(run_id, "failed", error="engine: CUDA out of memory", timings={"total_s": 3.0})
    run = store.get_run(run_id)
    assert run["status"] == "failed" and run["error"] == "engine: CUDA out of memory"
    assert run["p_hat"] is None and run["report"] is None and run["estimates"] == []


def test_finish_is_one_transaction(store, build_report):
    """A sample the database rejects (score outside [0, 1]) after the run update and the
    estimates inserts leaves no trace: the run is still running, with no figures."""
    report, samples = build_report(["a", "b"])
    run_id = start(store)
    bad = samples[:-1] + [dict(samples[-1], score=1.5)]
    with pytest.raises(RuntimeFailure, match=f"closing run {run_id}"):
        store.finish_run(run_id, "succeeded", report=report, samples=bad)

    run = store.get_run(run_id)
    assert run["status"] == "running" and run["finished_at"] is None
    assert run["report"] is None and run["p_hat"] is None and run["estimates"] == []
    assert store.get_samples(run_id) == []
    # Nothing half-done blocks the real close.
    store.finish_run(run_id, "succeeded", report=report, samples=samples)
    assert store.get_run(run_id)["status"] == "succeeded" and len(store.get_samples(run_id)) == len(samples)


def test_malformed_input_is_refused_before_any_write(store, build_report):
    report, samples = build_report(["a"])
    run_id = start(store)
    with pytest.raises(InputError, match="unknown keys"):
        store.finish_run(run_id, "succeeded", report=report, samples=[dict(samples[0], prompt="a")])
    with pytest.raises(InputError, match="report must be"):
        store.finish_run(run_id, "succeeded", report={"estimates": []})
    with pytest.raises(InputError, match="needs its report"):
        store.finish_run(run_id, "succeeded")
    with pytest.raises(InputError, match="one of succeeded, failed, interrupted"):
        store.finish_run(run_id, "running")
    assert store.get_run(run_id)["status"] == "running"


def test_refuses_to_finish_twice(store, build_report):
    report, _ = build_report(["a"])
    run_id = start(store)
    store.finish_run(run_id, "succeeded", report=report)
    with pytest.raises(RuntimeFailure, match=f"run {run_id} is already 'succeeded'"):
        store.finish_run(run_id, "failed", error="late failure")
    run = store.get_run(run_id)
    assert run["status"] == "succeeded" and run["error"] is None and len(run["estimates"]) == 1
    with pytest.raises(RuntimeFailure, match="run 9999 does not exist"):
        store.finish_run(9999, "failed")


def test_stale_runs_are_interrupted_but_a_live_peer_is_not(make_store, backdate):
    a = make_store("host-a")
    b = make_store("host-b")
    run_a = start(a, "m1")
    run_b = start(b, "m2")

    # b starts up (or sweeps) while a is alive: a's run has a fresh heartbeat.
    assert b.interrupt_stale_runs() == []
    assert a.get_run(run_a)["status"] == "running"

    # a stops heartbeating for longer than stale_after_s (300 s by default).
    backdate(a, RUNS, "id", run_a, "heartbeat_at", 301)
    assert b.interrupt_stale_runs() == [run_a]
    run = a.get_run(run_a)
    assert run["status"] == "interrupted" and "no heartbeat for over 300 s" in run["error"]
    assert run["finished_at"] is not None
    assert b.get_run(run_b)["status"] == "running"
    # The stalled owner finds out when it tries to carry on.
    assert a.heartbeat(run_a) is False
    with pytest.raises(RuntimeFailure, match="already 'interrupted'"):
        a.finish_run(run_a, "failed", error="too late")
    assert b.interrupt_stale_runs() == []


def test_stale_after_is_configurable(make_store, backdate):
    a = make_store("host-a")
    b = make_store("host-b", stale_after_s=60)
    assert b.stale_after_s == 60.0  # the daemon derives its heartbeat interval from it
    run_id = start(a)
    backdate(a, RUNS, "id", run_id, "heartbeat_at", 30)
    assert b.interrupt_stale_runs() == []
    a.heartbeat(run_id)  # a fresh heartbeat resets the clock ...
    assert b.interrupt_stale_runs() == []
    backdate(a, RUNS, "id", run_id, "heartbeat_at", 90)  # ... and silence past 60 s ends it
    assert b.interrupt_stale_runs() == [run_id]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_previous_incarnation_is_interrupted_at_once(make_store):
    """host-a killed -9 and restarted: its old runs have fresh heartbeats but are certainly dead."""
    old = make_store("host-a")
    old.token = f"{dead_pid()}-0123456789abcdef"  # the process that wrote them is gone
    peer = make_store("host-b")
    old_run = start(old, "m1")
    peer_run = start(peer, "m2")

    new = make_store("host-a")
    assert new.token != old.token
    new_run = start(new, "m3")
    assert new.interrupt_stale_runs() == [old_run]
    run = new.get_run(old_run)
    assert run["status"] == "interrupted" and "instance 'host-a' was restarted" in run["error"]
    assert new.get_run(new_run)["status"] == "running"  # its own current run
    assert new.get_run(peer_run)["status"] == "running"  # a live peer's run


def test_a_live_process_of_the_same_instance_is_not_interrupted(make_store):
    """`tailmon run --once` beside the daemon on one host: same instance id, both alive."""
    daemon = make_store("host-a")
    run_id = start(daemon, "m1")
    once = make_store("host-a")
    assert once.interrupt_stale_runs() == []
    assert once.get_run(run_id)["status"] == "running"
    assert once.try_lock("m2") and not once.try_lock("m2")
    assert daemon.try_lock("m2") is False  # held by a live process


def test_heartbeat_thread_and_run_thread_write_concurrently(store, build_report):
    """A heartbeat thread ticking while the run thread writes a large close: no 'database is
    locked' (SQLite: WAL, busy timeout, BEGIN IMMEDIATE) and every heartbeat lands."""
    report, samples = build_report([f"prompt {i}" for i in range(10)], n=200)
    run_id = start(store)
    stop = threading.Event()
    errors, beats = [], []

    def beat():
        try:
            while not stop.is_set():
                beats.append(store.heartbeat(run_id))
        except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        while len(beats) < 3:
            pass
        store.finish_run(run_id, "succeeded", report=report, samples=samples)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert beats[0] is True and beats[-1] is False  # alive until closed, then harmlessly ignored
    assert len(store.get_samples(run_id)) == 2000


def test_log_weights_keep_minus_infinity(store, build_report):
    """A sample impossible under the target has log w = -inf (w = 0): stored as such, not lost."""
    report, samples = build_report(["a"], n=10)
    samples[0]["log_weight"] = -math.inf
    samples[1]["log_weight"] = None  # Monte Carlo samples have no weight
    run_id = start(store)
    store.finish_run(run_id, "succeeded", report=report, samples=samples)
    stored = store.get_samples(run_id)
    assert stored[0]["log_weight"] == -math.inf and stored[1]["log_weight"] is None
    assert stored[2]["log_weight"] == pytest.approx(samples[2]["log_weight"])


def test_list_get_and_last_run(store, build_report):
    report, _ = build_report(["a"])
    r1 = start(store, "m1")
    store.finish_run(r1, "succeeded", report=report)
    r2 = start(store, "m1")
    store.finish_run(r2, "failed", error="boom")
    r3 = start(store, "m2")
    r4 = start(store, "m1")

    assert [r["id"] for r in store.list_runs()] == [r4, r3, r2, r1]
    assert [r["id"] for r in store.list_runs("m1")] == [r4, r2, r1]
    assert [r["id"] for r in store.list_runs(status="running")] == [r4, r3]
    assert [r["id"] for r in store.list_runs("m1", limit=2)] == [r4, r2]
    assert "report" not in store.list_runs()[0]
    with pytest.raises(InputError, match="status must be one of"):
        store.list_runs(status="done")

    assert store.last_run("m1")["id"] == r1
    assert store.last_run("m1")["estimates"][0]["prompt"] == "a"
    assert store.last_run("m1", status=None)["id"] == r4
    assert store.last_run("m1", status="failed")["id"] == r2
    assert store.last_run("m2") is None and store.last_run("nope", status=None) is None
    assert store.get_run(12345) is None


def test_model_version_increments_only_on_a_changed_fingerprint(store):
    assert store.model_version("m1", "smollm2", "sha-A") == 1
    assert store.model_version("m1", "smollm2", "sha-A") == 1
    assert store.model_version("m1", "/models/smollm2-v2", "sha-B") == 2
    assert store.model_version("m1", "/models/smollm2-v2", "sha-B") == 2
    assert store.model_version("m1", "smollm2", "sha-A") == 3  # back to A is a change too
    assert store.model_version("m2", "smollm2", "sha-A") == 1  # per monitor


def test_prompts_responses_and_errors_are_stored_redacted(store, build_report):
    prompt = "Email jane.doe@example.com or call +44 20 7946 0958 about the 2024-05-01 invoice"
    response = "Sure, write to bob@corp.io or ring (555) 123-4567"
    # a category is the source's free text; the deployed system prompt is in the run's settings
    report, samples = build_report([(prompt, "tickets of ops@corp.io")], n=10, responses=[response])
    report["system_prompt"] = "You are the helpdesk of help@shop.example"
    assert redact(prompt) != prompt and redact(response) != response  # the texts carry personal data

    run_id = start(store, settings={"model": {"ref": "m", "system_prompt": "Escalate to lead@shop.example"}})
    store.finish_run(run_id, "succeeded", report=report, samples=samples)
    failed = start(store)
    store.finish_run(failed, "failed", error=f"judge crashed on prompt {prompt!r}")

    run = store.get_run(run_id)
    assert run["estimates"][0]["prompt"] == redact(prompt)
    assert "[EMAIL]" in redact(prompt) and "[PHONE]" in redact(prompt) and "2024-05-01" in redact(prompt)
    assert run["report"]["estimates"][0]["prompt"] == redact(prompt)
    assert run["report"]["system_prompt"] == "You are the helpdesk of [EMAIL]"
    assert {s["response"] for s in store.get_samples(run_id)} == {redact(response)}
    assert "[EMAIL]" in store.get_run(failed)["error"]

    # Nothing anywhere in the database still holds the addresses or numbers.
    tables = MetaData()
    with store.engine.connect() as conn:
        tables.reflect(conn)
        dump = " ".join(str(tuple(row)) for table in tables.sorted_tables
                        for row in conn.execute(select(table)))
    assert "Sure, write to" in dump  # the dump does contain the stored texts
    for secret in ("jane.doe@example.com", "7946 0958", "bob@corp.io", "123-4567", "help@shop.example",
                   "ops@corp.io", "lead@shop.example"):
        assert secret not in dump
    assert run["estimates"][0]["category"] == "tickets of [EMAIL]"
    assert run["settings"]["model"]["system_prompt"] == "Escalate to [EMAIL]"


def test_credentials_are_masked_in_settings_reports_and_errors(store, build_report):
    """Catches a caller's settings, report or error stored with a credential in it (issue 18,
    item 2): whatever calls start_run/finish_run, no URL password or secret query value is stored."""
    settings = {"prompts": {"type": "sql", "url": "postgresql://reader:pw-settings@db/logs?sslmode=require"},
                "judge": "endpoint:https://guard.example/v1?api_key=key-settings"}
    report, _ = build_report(["Write a poem"], n=10)
    report["judge"] = "endpoint:https://guard.example/v1?token=tok-report"
    run_id = start(store, settings=settings)
    store.finish_run(run_id, "succeeded", report=report)
    failed = start(store)
    store.finish_run(failed, "failed", error="cannot use postgresql://reader:pw-error@db/logs: timeout")

    run = store.get_run(run_id)
    assert run["settings"] == {"prompts": {"type": "sql", "url": "postgresql://reader:***@db/logs?sslmode=require"},
                               "judge": "endpoint:https://guard.example/v1?api_key=***"}
    assert run["report"]["judge"] == "endpoint:https://guard.example/v1?token=***"
    assert store.get_run(failed)["error"] == "cannot use postgresql://reader:***@db/logs: timeout"
    tables = MetaData()
    with store.engine.connect() as conn:
        tables.reflect(conn)
        dump = " ".join(str(tuple(row)) for table in tables.sorted_tables for row in conn.execute(select(table)))
    assert "guard.example" in dump  # the dump does contain the stored settings
    for secret in ("pw-settings", "key-settings", "tok-report", "pw-error"):
        assert secret not in dump


def test_an_adaptive_update_is_kept_with_its_run(store, build_report):
    """`record_adaptive_update` adds the update to the closed run's report, keeping what the run
    drew with, on both backends; a run without a report is refused.
    Catches: the update overwriting the run's `adaptive` block (which adapter and weights it
    used), or written to another run."""
    report, _ = build_report(["a b", "c d"])
    report["adaptive"] = {"generation": 2, "adapter": "/state/adapters/gen-0002", "weights": {"adapter": 4.0}}
    first, second = start(store), start(store)
    store.finish_run(first, "succeeded", report=report)
    store.finish_run(second, "succeeded", report=build_report(["e f"])[0])
    update = {"adopted": True, "generation_before": 2, "generation_after": 3, "reason": "adopted: ...",
              "held_out": {"variance_before": 2.5e-5, "variance_after": 1.0e-5}}
    store.record_adaptive_update(first, update)
    stored = store.get_run(first)["report"]
    assert stored["adaptive"] == {**report["adaptive"], "update": update}
    assert {k: v for k, v in stored.items() if k != "adaptive"} == {k: v for k, v in report.items() if k != "adaptive"}
    assert "adaptive" not in store.get_run(second)["report"]
    running = start(store)
    with pytest.raises(RuntimeFailure, match=f"run {running} has no report"):
        store.record_adaptive_update(running, update)
