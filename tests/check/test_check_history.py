"""`tailmon check --baseline-from-history`: the ratio gate against the production monitor's stored
history (unpaired), its false-failure rate on simulated series with a known ratio, and the command
end to end on the tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from scipy import stats

from pooling_support import MU, SPREAD, adaptive_series, run_estimates  # noqa: E402
from tailmon.check.gate import history_ratio_gate, unreliable_estimates
from tailmon.cli.main import main
from tailmon.estimators import aggregate
from tailmon.estimators.pooling import pool


def gate_on(rng, true_ratio, max_ratio=1.5, m=30):
    """The history: a pooled series of 5 adaptive runs of 10 prompts; the candidate: 30 prompts
    whose P(x) is `true_ratio` times the history's population."""
    history = pool(adaptive_series(rng)).to_dict()
    cand = run_estimates(np.exp(rng.normal(MU, SPREAD, m)) * true_ratio, 1500.0 / true_ratio, rng)
    return history_ratio_gate(aggregate(cand).to_dict(), unreliable_estimates(cand, "candidate", 0.95), history,
                              max_ratio, 0.95)


def test_false_failures_at_most_the_level():
    """At a true ratio of exactly R (the hardest null) the gate fails at most 1 - confidence = 5% of
    the time (history_ratio_gate's doc: Bonferroni over the two one-sided 97.5% ends). 400 checks;
    the tolerance: failures ~ Binomial(400, <= 0.05), and the test fails above its 99.9% quantile
    (35, 8.8%). Measured: 1 of 400 (264 pass, 135 inconclusive on an unreliable candidate prompt).
    Catches the naive ratio of the two point estimates (198 of 400 fail at the null); one end
    replaced by its point estimate alone stays within the Bonferroni slack here and is not caught."""
    rng = np.random.default_rng(30)
    reps = 400
    verdicts = [gate_on(rng, 1.5).verdict for _ in range(reps)]
    fails = verdicts.count("fail")
    assert fails <= stats.binom.ppf(0.999, reps, 0.05), fails
    assert verdicts.count("pass") >= reps // 2  # mostly decided, not inconclusive


def test_a_large_rise_fails():
    """A true ratio of 4 against R = 1.5 fails in most checks (measured 100 of 100)."""
    rng = np.random.default_rng(31)
    verdicts = [gate_on(rng, 4.0).verdict for _ in range(100)]
    assert verdicts.count("fail") >= 90


def test_unreliable_history_passes_only_on_bounds():
    history = {"ci_high": 1e-3, "ci_low": 1e-4, "bound_only": True, "n_runs": 2, "n_samples": 600,
               "warnings": ["12 prompts (< 20)"], "series": {"model_version": 3}}
    cand = {"ci_low": 1e-5, "ci_high": 5e-5}
    g = history_ratio_gate(cand, None, history, 2.0, 0.95)
    assert g.verdict == "inconclusive" and "upper bound only" in g.detail and "version 3" in g.detail
    g = history_ratio_gate({"ci_low": 3e-3, "ci_high": 4e-3}, None, history, 2.0, 0.95)
    assert g.verdict == "fail" and g.value == pytest.approx(3.0)  # its upper end still decides a failure
    reliable = {**history, "bound_only": False, "warnings": []}
    assert history_ratio_gate(cand, None, reliable, 2.0, 0.95).verdict == "pass"


# -- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture
def monitored(tmp_path, tiny_model_dir):
    """A config on the tiny model whose database holds two succeeded runs of its monitor."""
    from daemon_support import write_config  # tests/ is on sys.path
    from tailmon.monitor.config import load_config
    from tailmon.monitor.daemon import Daemon
    from tailmon.monitor.metrics import Metrics

    path = write_config(tmp_path, tiny_model_dir, judge="prefix:a", proposals=[],
                        estimator={"method": "mc", "samples": 30, "seed": 3})
    daemon = Daemon(load_config(path), metrics=Metrics(CollectorRegistry()))
    assert [o.status for o in daemon.run_once() + daemon.run_once()] == ["succeeded", "succeeded"]
    return path


def test_check_takes_its_baseline_from_history(monitored, tiny_model_dir):
    result = CliRunner().invoke(main, ["check", "--config", str(monitored), "--candidate", str(tiny_model_dir),
                                       "--baseline-from-history", "--max-ratio", "50", "--format", "json",
                                       "--quiet"])
    assert result.exit_code in (0, 1), result.output
    data = json.loads(result.stdout)
    history = data["baseline_from_history"]
    assert history["n_runs"] == 2 and history["series"]["model_version"] == 1
    [gate] = [g for g in data["gates"] if g["name"] == "max-ratio"]
    assert "history" in gate["detail"] and data["baseline"] is None
    # the same model against its own history: never a failure at R = 50
    assert gate["verdict"] in ("pass", "inconclusive") and math.isfinite(history["ci_high"])


def test_history_gate_in_the_reports(monitored, tiny_model_dir, tmp_path):
    out = tmp_path / "report"
    for fmt in ("table", "markdown"):
        result = CliRunner().invoke(main, ["check", "--config", str(monitored), "--candidate", str(tiny_model_dir),
                                           "--baseline-from-history", "--max-ratio", "50", "--format", fmt,
                                           "--report-dir", str(out), "--quiet"])
        assert result.exit_code in (0, 1), result.output
        assert "max-ratio" in result.stdout and "history" in result.stdout
    assert "history" in (out / "report.md").read_text() and (out / "junit.xml").exists()


@pytest.mark.parametrize("args, message", [
    (["--baseline-from-history", "--max-p", "0.5"], "add --max-ratio"),
    (["--baseline-from-history", "--max-ratio", "2", "--baseline", "BASE"], "give one"),
])
def test_history_baseline_usage_errors(monitored, tiny_model_dir, args, message):
    args = [str(tiny_model_dir) if a == "BASE" else a for a in args]
    result = CliRunner().invoke(main, ["check", "--config", str(monitored), "--candidate", str(tiny_model_dir),
                                       *args, "--quiet"])
    assert result.exit_code == 2 and message in result.output


def test_history_baseline_needs_a_stored_run(tmp_path, tiny_model_dir):
    from daemon_support import write_config
    from tailmon.store import Store

    path = write_config(tmp_path, tiny_model_dir)
    Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open().close()  # an empty database
    result = CliRunner().invoke(main, ["check", "--config", str(path), "--candidate", str(tiny_model_dir),
                                       "--baseline-from-history", "--max-ratio", "2", "--quiet"])
    assert result.exit_code == 2 and "no succeeded run" in result.output
