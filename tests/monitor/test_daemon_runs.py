"""The daemon's run cycle against a real SQLite store, on the tiny model saved as a model folder."""

from __future__ import annotations

import json

import logging
import shutil
import time

import pytest
from prometheus_client import CollectorRegistry

from tailmon.monitor.config import load_config
from tailmon.monitor.daemon import Daemon
from tailmon.monitor.metrics import Metrics
from tailmon.store import Store

from daemon_support import write_config  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A private copy of the tiny model folder (some tests change it on disk)."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def new_daemon(path):
    return Daemon(load_config(path), metrics=Metrics(CollectorRegistry()))


def test_run_once_stores_and_exports_the_same_figures(tmp_path, model_copy):
    daemon = new_daemon(write_config(tmp_path, model_copy))
    [outcome] = daemon.run_once()
    assert outcome.status == "succeeded", outcome.error
    store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
    run = store.get_run(outcome.run_id)
    assert run["status"] == "succeeded"
    assert len(run["estimates"]) == 3
    agg = run["report"]["aggregate"]
    get = daemon.metrics.registry.get_sample_value
    assert get("tailmon_harm_probability", {"monitor": "tiny"}) == pytest.approx(agg["p_hat"], rel=1e-12)
    assert get("tailmon_harm_probability_upper_bound", {"monitor": "tiny"}) == pytest.approx(agg["ci_high"], rel=1e-12)
    ex = run["report"]["extrapolations"]["1d"]
    assert get("tailmon_expected_harmful_outputs", {"monitor": "tiny", "window": "1d"}) == pytest.approx(
        ex["expected_per_window"]["expected"], rel=1e-12)
    # 20 samples per prompt, defensive 0.2: 4 from the target, 16 from the proposal, for 3 prompts.
    assert get("tailmon_samples_generated_total", {"monitor": "tiny", "role": "target"}) == 12
    assert get("tailmon_samples_generated_total", {"monitor": "tiny", "role": "proposal"}) == 48
    assert get("tailmon_runs_total", {"monitor": "tiny", "status": "succeeded"}) == 1
    store.close()


def test_runs_differ_but_replay(tmp_path, model_copy):
    """Each run derives its seed from the base seed and its run id: two runs are two draws."""
    daemon = new_daemon(write_config(tmp_path, model_copy))
    a, b = daemon.run_once() + daemon.run_once()
    assert a.result.seed != b.result.seed
    assert [r.estimate.p_hat for r in a.result.report.results] != [r.estimate.p_hat for r in b.result.report.results]


def test_changed_checkpoint_is_reloaded_and_versioned(tmp_path, model_copy):
    daemon = new_daemon(write_config(tmp_path, model_copy))
    first = daemon.run_once()[0]
    engine_before = daemon.models.get(daemon.config.monitors[0].engine_settings(), _fingerprint(model_copy))
    same = daemon.run_once()[0]
    # A new checkpoint lands in the folder (here: the weights file rewritten).
    weights = next(model_copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())
    later = time.time() + 5
    import os

    os.utime(weights, (later, later))
    changed = daemon.run_once()[0]
    store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
    versions = [store.get_run(o.run_id)["model_version"] for o in (first, same, changed)]
    store.close()
    assert versions == [1, 1, 2]
    engine_after = daemon.models.get(daemon.config.monitors[0].engine_settings(), _fingerprint(model_copy))
    assert engine_after is not engine_before
    assert daemon.metrics.registry.get_sample_value(
        "tailmon_model_info", {"monitor": "tiny", "model": str(model_copy), "model_version": "2"}) == 1


def _fingerprint(path):
    from tailmon.monitor.daemon import model_fingerprint

    return model_fingerprint(str(path))


def test_unreachable_database_fails_the_run_not_the_daemon(tmp_path, model_copy, caplog):
    # Nothing listens on port 9 of loopback: the connection is refused at once.
    cfg = write_config(tmp_path, model_copy, database="postgresql://tailmon:s3cret@127.0.0.1:9/tailmon")
    daemon = new_daemon(cfg)
    with caplog.at_level(logging.ERROR, logger="tailmon.daemon"):
        outcome = daemon.run_monitor("tiny")
        again = daemon.run_monitor("tiny")
    assert outcome.status == again.status == "failed"
    assert "127.0.0.1:9" in outcome.error and "s3cret" not in outcome.error
    assert any("run failed" in r.getMessage() for r in caplog.records)
    assert daemon.metrics.registry.get_sample_value("tailmon_runs_total", {"monitor": "tiny", "status": "failed"}) == 2


def test_bad_prompt_source_fails_the_run_with_its_reason(tmp_path, model_copy):
    cfg = write_config(tmp_path, model_copy, prompts={"type": "file", "path": "missing.jsonl", "per_run": 3})
    daemon = new_daemon(cfg)
    [outcome] = daemon.run_once()
    assert outcome.status == "failed"
    assert "missing.jsonl" in outcome.error
    store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
    run = store.get_run(outcome.run_id)
    store.close()
    assert run["status"] == "failed" and "missing.jsonl" in run["error"]


def test_a_locked_monitor_is_skipped(tmp_path, model_copy):
    cfg = write_config(tmp_path, model_copy)
    peer = Store(f"sqlite:///{tmp_path / 'tailmon.db'}", instance_id="peer").open()
    assert peer.try_lock("tiny")
    daemon = new_daemon(cfg)
    [outcome] = daemon.run_once()
    assert outcome.status == "skipped" and outcome.run_id is None
    peer.release_lock("tiny")
    [outcome] = daemon.run_once()
    assert outcome.status == "succeeded"
    peer.close()


def test_a_monitor_without_proposals_is_adaptive_and_starts_from_the_library(tmp_path, model_copy, monkeypatch):
    """No proposals: the library's system prompts and a hotter target, and the monitor learns
    (its state under $TAILMON_STATE_DIR/adaptive/<monitor>); `adaptive: {enabled: false}` keeps
    the library alone."""
    from tailmon.proposals import default_proposals

    monkeypatch.setenv("TAILMON_STATE_DIR", str(tmp_path / "state"))
    daemon = new_daemon(write_config(tmp_path, model_copy, proposals=[]))
    [outcome] = daemon.run_once()
    assert outcome.status == "succeeded", outcome.error
    labels = [c.label for c in outcome.result.report.plan.components]
    # The prompts' categories are x and y (unknown to the library): the general prompt only,
    # and the target at 1.5 x its temperature (1).
    assert labels == ["target"] + default_proposals({"x", "y"}) + ["temperature:1.5"]
    assert labels[1].startswith("system:")
    assert outcome.result.to_dict()["adaptive"]["generation"] == 0
    state_file = tmp_path / "state" / "adaptive" / "tiny" / "state.json"
    assert state_file.is_file()

    # A learnt target share (as an update adopts one) is the next run's, never below the config's
    # `defensive` (0.2 here). Catches: the daemon drawing at the configured share whatever was learnt.
    for learnt, used in ((0.5, 0.5), (0.1, 0.2)):
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({**state, "target_share": learnt}))
        [outcome] = new_daemon(write_config(tmp_path, model_copy, proposals=[])).run_once()
        assert outcome.status == "succeeded", outcome.error
        assert outcome.result.report.plan.components[0].share == used
        assert outcome.result.to_dict()["adaptive"]["target_share"] == used

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    daemon = new_daemon(write_config(fixed, model_copy, proposals=[], adaptive={"enabled": False}))
    [outcome] = daemon.run_once()
    assert [c.label for c in outcome.result.report.plan.components] == ["target"] + default_proposals({"x", "y"})
    assert "adaptive" not in outcome.result.to_dict()


def test_an_adaptive_monitor_learns_across_restarts(tmp_path, model_copy):
    """Three runs, each by a new daemon (a restart) on one state folder: each run's mixture is the
    state left by the runs before, recorded with the run, and the update after each run is
    recorded with it.

    Catches: state kept in memory only (the third run would start from scratch), a run that does
    not record which adapter and weights it used, an update that is not stored."""
    # time_share 1000: all 10 steps always run (the default caps them at half the run's time, so
    # how many ran, and whether an update was adopted, would depend on the machine's load).
    cfg = write_config(tmp_path, model_copy, samples=60, judge="regex:Sure|ab", proposals="adaptive",
                       adaptive={"state_dir": "learnt", "steps": 10, "time_share": 1000})
    runs = []
    for _ in range(3):
        [outcome] = new_daemon(cfg).run_once()
        assert outcome.status == "succeeded", outcome.error
        store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
        runs.append(store.get_run(outcome.run_id))
        store.close()
    used = [r["report"]["adaptive"] for r in runs]
    updates = [u["update"] for u in used]
    adopted = [u["adopted"] for u in updates]
    assert adopted[:2] == [True, True], updates  # these seeds adopt both: the third run uses both
    assert [u["generation"] for u in used] == [0, 1, 2]
    assert [u["generation_after"] for u in updates] == [1, 2, 2 + adopted[2]]
    third = runs[2]["report"]
    # what the third run drew from: the adapter and the tilt the state held (these seeds learn a
    # tilt, and an adapter too, or not, as the held-out variance chose)
    learnt = {"lora": ("adapter", "adapters"), "tilt": ("tilt", "tilts")}
    assert any(used[2][key] for key, _ in learnt.values()), used[2]
    for kind, (key, folder) in learnt.items():
        comps = [c["label"] for c in third["components"] if c["label"].startswith(f"{kind}:")]
        assert comps == ([f"{kind}:{used[2][key]}"] if used[2][key] else []), (kind, comps, used[2])
        if used[2][key]:
            assert used[2][key].startswith(str(tmp_path / "learnt" / folder))
            assert used[2][f"{key}_sha256"] and key in used[2]["weights"]
    # the shares the run drew with are the recorded weights, normalised in what the target's
    # recorded share (the defensive 0.2, or a higher one learnt) leaves
    weights = used[2]["weights"]
    total = sum(weights.values())
    assert third["components"][0]["share"] == used[2]["target_share"] >= 0.2
    for c in third["components"][1:]:
        key = {"lora": "adapter", "tilt": "tilt"}.get(c["label"].split(":", 1)[0], c["label"])
        assert c["share"] == pytest.approx((1 - used[2]["target_share"]) * weights[key] / total)
    # `tailmon runs show` says it too
    from click.testing import CliRunner

    from tailmon.cli.main import main

    shown = CliRunner().invoke(main, ["runs", "show", str(runs[2]["id"]), "--config", str(cfg)])
    assert shown.exit_code == 0, shown.output
    adapter = f"adapter {used[2]['adapter']}" if used[2]["adapter"] else "no adapter yet"
    tilt = f", tilt {used[2]['tilt']}" if used[2]["tilt"] else ""
    assert f"adaptive proposal: generation 2, {adapter}{tilt}" in shown.output
    assert f"after the run: generation 2 -> {updates[2]['generation_after']}: {updates[2]['reason']}" in shown.output


def test_stored_settings_use_the_config_s_own_key_names(tmp_path, model_copy):
    # An alert rule's `for` was stored (and printed by `runs show`) as `for_runs`, the field's
    # Python name: the stored settings are the config as the operator wrote it.
    rule = {"name": "harm-high", "metric": "harm_probability", "op": ">", "threshold": 0.5, "for": 2}
    daemon = new_daemon(write_config(tmp_path, model_copy, alerts=[rule]))
    [outcome] = daemon.run_once()
    store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
    try:
        [stored] = store.get_run(outcome.run_id)["settings"]["alerts"]
    finally:
        store.close()
    assert stored["for"] == 2 and "for_runs" not in stored


def test_a_run_past_its_time_limit_fails_at_a_checkpoint_and_loses_nothing(tmp_path, model_copy):
    """Catches a run that goes on past its monitor's `timeout` (the time limit not checked at the
    checkpoints, so one slow run holds the daemon's one worker) and a timed-out run that loses or
    changes what was stored before it (issue 18, item 11)."""
    import yaml

    quick = new_daemon(write_config(tmp_path, model_copy))
    [first] = quick.run_once()
    assert first.status == "succeeded", first.error
    # A run of 60000 samples with a limit of 1 s: 12000 took 2.0 s on an idle 2-core machine
    # (8 s under load), so this one needs ~10 s: only a machine ~10x faster could finish before its limit.
    path = write_config(tmp_path, model_copy, samples=20000, timeout="1s",
                        model={"ref": str(model_copy), "max_new_tokens": 8, "batch_size": 64})
    assert yaml.safe_load(path.read_text())["monitors"][0]["timeout"] == "1s"
    daemon = new_daemon(path)
    t0 = time.time()
    [outcome] = daemon.run_once()
    elapsed = time.time() - t0
    assert outcome.status == "failed"
    assert outcome.error.startswith("timed out: the run passed its time limit (timeout: 1s)"), outcome.error
    # It stopped at a checkpoint past 1 s, before the run's end (one batch of 64 samples late at most).
    import re

    drawn = int(re.search(r"with (\d+) of 60000 samples drawn", outcome.error).group(1))
    assert drawn < 60000 and elapsed < 60, (drawn, elapsed)
    store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
    try:
        kept, failed = store.get_run(first.run_id), store.get_run(outcome.run_id)
    finally:
        store.close()
    assert kept["status"] == "succeeded" and len(kept["estimates"]) == 3
    assert kept["report"] == first.result.to_dict()
    assert failed["status"] == "failed" and failed["error"] == outcome.error
    assert failed["report"] is None and failed["estimates"] == []
    get = daemon.metrics.registry.get_sample_value
    assert get("tailmon_runs_total", {"monitor": "tiny", "status": "failed"}) == 1
    assert get("tailmon_run_in_progress", {"monitor": "tiny"}) == 0


def test_an_adaptive_monitor_keeps_its_adapter_across_a_checkpoint_change(tmp_path, model_copy):
    """A new checkpoint in the model folder: the next run still draws with the learnt adapter
    (its weights stay exact: p is scored under the new target), says so in its record and in
    every estimate's warnings, and the state records the change once.

    Catches: a learnt adapter silently dropped, or silently kept without a record, when the
    deployed checkpoint changes."""
    import json

    from safetensors.torch import load_file, save_file

    # Which components the first two runs adopt depends on the draws (on this judge a tilt alone
    # often wins): the first seed of these whose two runs adopt both an adapter and a tilt is used,
    # so that the test sees both kept. The replay is deterministic; the list only spares the test
    # from pinning one seed to one sampler's draws.
    for seed in (4, 1, 2, 3, 5, 6, 8, 9, 10, 11):
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        cfg = write_config(folder, model_copy, samples=60, judge="regex:Sure|ab", proposals="adaptive",
                           adaptive={"state_dir": "learnt", "steps": 10, "time_share": 1000},
                           estimator={"samples": 60, "defensive": 0.2, "seed": seed})
        for _ in range(2):
            [outcome] = new_daemon(cfg).run_once()
        state = json.loads((folder / "learnt" / "state.json").read_text())
        if state["adapter"] is not None and state["tilt"] is not None:
            break
    else:
        pytest.fail("no seed adopted both an adapter and a tilt in its first two runs")
    tmp_path = folder
    learnt = outcome.result.to_dict()["adaptive"]
    adapter = state["adapter"]
    weights = next(model_copy.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 1.01  # another checkpoint of the same model
    save_file(tensors, weights, metadata={"format": "pt"})
    [changed] = new_daemon(cfg).run_once()
    assert changed.status == "succeeded", changed.error
    record = changed.result.to_dict()["adaptive"]
    assert record["checkpoint_changed"] and record["adapter"] == str((tmp_path / "learnt" / adapter).resolve())
    assert record["tilt"] == str((tmp_path / "learnt" / state["tilt"]).resolve())  # the tilt is kept too
    assert record["generation"] >= learnt["generation"]
    assert record["adapter_trained_on"]["version"] == 1
    assert all(any("another checkpoint" in w for w in r.estimate.warnings) for r in changed.result.report.results)
    changes = json.loads((tmp_path / "learnt" / "state.json").read_text())["checkpoint_changes"]
    assert [(c["from_version"], c["to_version"], c["run_id"]) for c in changes] == [(1, 2, changed.run_id)]


def test_a_signal_whose_interrupt_is_lost_still_ends_run_once(tmp_path, model_copy):
    """A signal handler's KeyboardInterrupt is dropped when it lands in a finaliser the garbage
    collector is running (`Daemon.interrupt` says how); the handler's flag must still end the run:
    at its next checkpoint, recorded interrupted by a signal, KeyboardInterrupt out of `run_once`
    (exit 130). Simulated by calling `interrupt` from another thread without raising anything.
    Before: the run went on to succeed and its alert made `run --once` exit 1 (the flaky SIGINT
    process test). Checked to fail with the cancelled run returned as an outcome instead."""
    import threading

    daemon = new_daemon(write_config(tmp_path, model_copy, samples=4000,
                                     model={"ref": str(model_copy), "max_new_tokens": 8, "batch_size": 64}))
    url = f"sqlite:///{tmp_path / 'tailmon.db'}"

    def interrupt_when_running():
        deadline = time.time() + 120
        while time.time() < deadline:
            store = Store(url).open()
            try:
                if store.list_runs(monitor="tiny", status="running", limit=1):
                    break
            finally:
                store.close()
            time.sleep(0.05)
        time.sleep(0.3)  # inside the estimation
        daemon.interrupt()

    helper = threading.Thread(target=interrupt_when_running, daemon=True)
    helper.start()
    with pytest.raises(KeyboardInterrupt):
        daemon.run_once()
    helper.join(timeout=10)
    store = Store(url).open()
    try:
        [run] = store.list_runs(monitor="tiny", limit=5)
        run = store.get_run(run["id"])
    finally:
        store.close()
    assert run["status"] == "interrupted" and "signal" in run["error"], run["error"]
    assert run["report"] is None
