"""Evidence over runs end to end (issue 20): several `tailmon run --once` on one database pool
into one estimate narrower than any single run's, exported and shown; a changed checkpoint starts
a new series compared with the old one. The tiny model, as a model folder; about a minute."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from tailmon.cli.main import main as cli
from tailmon.monitor.config import load_config
from tailmon.monitor.daemon import Daemon
from tailmon.monitor.metrics import Metrics
from tailmon.store import Store

from daemon_support import write_config  # noqa: E402  (tests/ is on sys.path)

# Monte Carlo at P about 0.25 (the tiny model answers "a..." often): every prompt's estimate is
# reliable, so the pooled interval is the interval over prompts, not the unreliable prompts'
# conservative bounds (which pooling does not shrink, issue 16's rule)
SAMPLES, JUDGE = 60, "prefix:a"
PROMPTS = "".join(json.dumps({"prompt": p}) + "\n" for p in
                  ("a b", "ab!", "Sure a", "b a", "a a b", "! a", "b b", "a !"))


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def config(tmp_path, model_copy, **kw):
    path = write_config(tmp_path, model_copy, judge=JUDGE, proposals=[],
                        estimator={"method": "mc", "samples": SAMPLES, "seed": 7},
                        prompts={"type": "file", "path": "many.jsonl", "per_run": 8},
                        pooling={"horizon": "7d", "change": {"reference_runs": 2, "alpha": 0.01}}, **kw)
    (tmp_path / "many.jsonl").write_text(PROMPTS, encoding="utf-8")
    return path


def run_once(path):
    tailmon = str(Path(sys.executable).with_name("tailmon"))
    done = subprocess.run([tailmon, "run", "--config", str(path), "--once", "--format", "json"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: a built-in rule fires (few prompts)
    [outcome] = json.loads(done.stdout)
    assert outcome["status"] == "succeeded", outcome
    return outcome["run_id"]


def test_runs_pool_into_a_narrower_estimate_and_a_new_checkpoint_starts_a_series(tmp_path, model_copy):
    path = config(tmp_path, model_copy)
    ids = [run_once(path) for _ in range(4)]
    store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
    try:
        runs = [store.get_run(i) for i in ids]
    finally:
        store.close()
    pooled = runs[-1]["report"]["pooled"]
    assert pooled["n_runs"] == 4 and pooled["run_ids"] == ids and pooled["n_samples"] == 4 * 8 * SAMPLES
    width = pooled["ci_high"] - pooled["ci_low"]
    singles = [r["ci_high"] - r["ci_low"] for r in runs]
    assert width < min(singles), (width, singles)
    assert [r["report"]["pooled"]["n_runs"] for r in runs] == [1, 2, 3, 4]
    change = pooled["change"]
    assert change["status"] in ("armed", "alarm") and change["compared_with"] is None  # its own 2 reference runs

    # shown: runs list (table and JSON) and runs show
    env = {"TAILMON_DATABASE_URL": f"sqlite:///{tmp_path / 'tailmon.db'}"}
    listed = CliRunner().invoke(cli, ["runs", "list", "--format", "json"], env=env)
    assert listed.exit_code == 0, listed.output
    newest = json.loads(listed.output)[0]["pooled"]
    assert newest["n_runs"] == 4 and newest["ci_high"] == pooled["ci_high"]
    table = CliRunner().invoke(cli, ["runs", "list"], env=env)
    assert "pooled hi" in table.output and f"{pooled['ci_high']:.3g}" in table.output
    shown = CliRunner().invoke(cli, ["runs", "show", str(ids[-1])], env=env)
    assert shown.exit_code == 0 and "pooled over 4 run(s) of model version 1" in shown.output
    assert "change detector (2x rise, alpha 0.01)" in shown.output

    # a new checkpoint: a new series, armed at once against version 1's pooled history
    weights = next(model_copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())
    later = time.time() + 5
    os.utime(weights, (later, later))
    new = run_once(path)
    store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
    try:
        after = store.get_run(new)["report"]["pooled"]
    finally:
        store.close()
    assert after["series"]["model_version"] == 2 and after["n_runs"] == 1 and after["run_ids"] == [new]
    assert after["change"]["compared_with"]["model_version"] == 1
    assert after["change"]["compared_with"]["run_ids"] == ids
    assert after["change"]["reference"]["upper"] == pytest.approx(pooled["ci_high"])


def test_the_daemon_exports_the_pooled_figures(tmp_path, model_copy):
    daemon = Daemon(load_config(config(tmp_path, model_copy)), metrics=Metrics(CollectorRegistry()))
    outcomes = daemon.run_once() + daemon.run_once()
    assert [o.status for o in outcomes] == ["succeeded", "succeeded"]
    pooled = outcomes[-1].result.data["pooled"]
    get = daemon.metrics.registry.get_sample_value
    labels = {"monitor": "tiny"}
    assert get("tailmon_pooled_harm_probability_upper_bound", labels) == pytest.approx(pooled["ci_high"], rel=1e-12)
    assert get("tailmon_pooled_runs", labels) == 2 and get("tailmon_pooled_samples", labels) == 2 * 8 * SAMPLES
    # 16 prompts (< 20): an upper bound only, so no point or lower end is exported
    assert pooled["bound_only"]
    assert get("tailmon_pooled_harm_probability", labels) is None
    assert get("tailmon_pooled_harm_probability_lower_bound", labels) is None
    assert get("tailmon_pooled_estimate_reliable", labels) == 0
    # armed at the second run (reference_runs 2): evidence 0 against a threshold of 1/alpha
    assert get("tailmon_risk_increase_evidence", labels) == 0.0
    assert get("tailmon_risk_increase_threshold", labels) == pytest.approx(100.0)
    assert get("tailmon_risk_increase_alarm", labels) == 0.0
    # the run's own series are unchanged
    assert get("tailmon_harm_probability", labels) == pytest.approx(outcomes[-1].result.figures.p_hat, rel=1e-12)
