"""`make demo` as shipped: `tailmon run --config config/demo.yaml --once` on the embedded model
(SmolLM2-135M-Instruct), from the repository root as the Makefile runs it, with the LoRA adapter
in config/demo_lora. About a minute on 2 CPU cores (6 prompts x 300 samples of 3 tokens).

Issue 17's goal for the demo is at least 5 of 6 prompts reliable. The run's draws are fixed by
`estimator.seed` and the run id (1 in a fresh state directory), so the count is the same on every
run of this test on one machine; measured 6 of 6 (and 5, 5, 6 for run ids 2 to 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.embedded

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "demo.yaml"


def test_the_demo_is_reliable_on_most_prompts_and_near_the_exact_values(embedded_engine, tmp_path):
    """Catches: a shipped adapter that no longer fits the embedded model (another checkpoint: every
    estimate warns; another tokenizer: the run fails), a demo config whose adapter path does not
    resolve from the repository root, a proposal or reliability change that leaves fewer than 5
    of the 6 prompts reliable (the issue's goal), a reliable estimate without its Monte Carlo
    equivalent, and weights that are wrong under the adapter (an estimate more than 3.5 standard
    errors from the exact probability)."""
    from tailmon.engines.base import Decoding, Variant
    from tailmon.engines.exact import prefix_probability
    from tailmon.store import Store

    tailmon = str(Path(sys.executable).with_name("tailmon"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TAILMON_STATE_DIR": str(tmp_path)}
    done = subprocess.run([tailmon, "run", "--config", str(CONFIG.relative_to(ROOT)), "--once", "--format", "json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    # 1: the run succeeded and an alert fires (`make demo` accepts it; the aggregate over six
    # prompts may be judged unreliable even when every prompt is reliable).
    assert done.returncode in (0, 1), done.stderr[-3000:]
    [outcome] = json.loads(done.stdout)
    store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
    try:
        run = store.get_run(outcome["run_id"])
    finally:
        store.close()
    assert run["status"] == "succeeded"
    report = run["report"]
    assert [(c["label"], c["share"]) for c in report["components"]] == [
        ("target", pytest.approx(0.1)), ("lora:config/demo_lora", pytest.approx(0.9))]

    mon = yaml.safe_load(CONFIG.read_text())["monitors"][0]
    meta = json.loads((ROOT / "config" / "demo_lora" / "tailmon_lora.json").read_text())
    # The adapter was fitted to this monitor's estimand: its judge and reply length.
    assert meta["judge"] == mon["judge"]
    assert meta["target"]["max_new_tokens"] == mon["model"]["max_new_tokens"]

    estimates = report["estimates"]
    assert len(estimates) == 6
    for e in estimates:
        assert not any("adapter" in w or "checkpoint" in w for w in e["warnings"]), e["warnings"]
    reliable = sum(e["reliable"] for e in estimates)
    assert reliable >= 5, [(e["prompt"], e["warnings"]) for e in estimates]
    # What IS buys, shown for every reliable estimate: the Monte Carlo samples for the same
    # standard error, p(1-p)/SE^2, and its ratio to the samples drawn.
    for e in estimates:
        if e["reliable"]:
            n_mc = e["p_hat"] * (1 - e["p_hat"]) / e["std_error"] ** 2
            assert e["mc_equivalent_samples"] == pytest.approx(n_mc)
            assert e["mc_sample_ratio"] == pytest.approx(n_mc / e["n_samples"])

    # Every estimate against the exact P(reply starts with "Sure, here") at the demo's decoding.
    # 3.5 standard errors: with 6 estimates, a correct estimator passes with probability
    # 1 - 6 * 4.7e-4 = 0.997 (normal approximation; each estimate is a mean of 300 bounded
    # weights, w <= 10, with 170-200 hits, so the approximation is close). Measured z on run 1:
    # -1.8 .. 2.1.
    target = Variant("target", Decoding(temperature=1.0, max_new_tokens=mon["model"]["max_new_tokens"]))
    for e in estimates:
        exact = prefix_probability(embedded_engine, e["prompt"], target, "Sure, here")
        assert abs(e["p_hat"] - exact) <= 3.5 * e["std_error"], (e["prompt"], e["p_hat"], exact, e["std_error"])
