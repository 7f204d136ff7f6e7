"""`tailmon runs list/show` over a real SQLite store, found through the config or the environment."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tailmon.cli.main import main
from tailmon.store import Store

REPORT = {
    "model": "m", "method": "is", "judge": "prefix:Sure", "n_samples": 10,
    "components": [{"label": "target", "share": 0.1}, {"label": "system:Sure", "share": 0.9}],
    "decoding": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 3},
    "estimates": [{"prompt": "mail bob@example.com", "category": None, "method": "is", "n_samples": 10,
                   "p_hat": 0.01, "ci_low": 0.001, "ci_high": 0.05, "n_harmful": 5, "h_sum": 1.0,
                   "ess": 8.0, "ess_wh": 11.0, "khat": 0.3, "kl": 0.1, "max_weight_share": 0.2,
                   "reliable": True, "upper_bound_only": False, "warnings": []}],
    "aggregate": {"n_prompts": 1, "n_samples": 10, "p_hat": 0.01, "ci_low": 0.001, "ci_high": 0.05,
                  "std_error": 0.01, "n_harmful": 5, "reliable": True, "n_unreliable": 0, "by_category": {},
                  "warnings": []},
}


@pytest.fixture
def db(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    monkeypatch.setenv("TAILMON_DATABASE_URL", url)
    with Store(url) as store:
        ok = store.start_run("prod", model_ref="m", model_version=1, config_hash="h", settings={})
        store.finish_run(ok, "succeeded", report=REPORT)
        bad = store.start_run("prod", model_ref="m", model_version=1, config_hash="h", settings={})
        store.finish_run(bad, "failed", error="model 'm' failed to load")
        other = store.start_run("staging", model_ref="m", model_version=1, config_hash="h", settings={})
    return {"ok": ok, "bad": bad, "other": other}


def test_list_from_the_environment(db):
    result = CliRunner().invoke(main, ["runs", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 4  # header + 3 runs, newest first
    assert lines[1].split()[:3] == [str(db["other"]), "staging", "running"]
    result = CliRunner().invoke(main, ["runs", "list", "--monitor", "prod", "--status", "succeeded", "--format", "json"])
    rows = json.loads(result.output)
    assert [r["id"] for r in rows] == [db["ok"]]
    assert rows[0]["p_hat"] == 0.01
    assert "settings" not in rows[0]  # ~100 lines a run: `runs show` has them


def test_show_prints_figures_redacted(db):
    result = CliRunner().invoke(main, ["runs", "show", str(db["ok"])])
    assert result.exit_code == 0, result.output
    assert f"run {db['ok']}: monitor prod, succeeded" in result.output
    assert "[EMAIL]" in result.output and "bob@example.com" not in result.output
    result = CliRunner().invoke(main, ["runs", "show", str(db["bad"]), "--format", "json"])
    data = json.loads(result.output)
    assert data["status"] == "failed" and "failed to load" in data["error"]


def test_show_prints_the_monte_carlo_equivalents(tmp_path, monkeypatch):
    """`runs show` has each estimate's MC-sample and MC-time ratios and the run's line; the stored
    run without them (before they existed, or unreliable) shows dashes (test above). Catches a
    table that drops them."""
    report = json.loads(json.dumps(REPORT))
    report["estimates"][0].update(mc_equivalent_samples=990.0, mc_sample_ratio=99.0)
    report["aggregate"].update(mc_equivalent_samples=990.0, mc_sample_ratio=99.0)
    report["timing"] = {"estimates": [{"seconds": 1.0, "plain_seconds_per_sample": 0.03, "mc_time_ratio": 31.0}],
                        "aggregate": {"seconds": 1.0, "mc_time_ratio": 31.0}}
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    monkeypatch.setenv("TAILMON_DATABASE_URL", url)
    with Store(url) as store:
        run_id = store.start_run("prod", model_ref="m", model_version=1, config_hash="h", settings={})
        store.finish_run(run_id, "succeeded", report=report)
    result = CliRunner().invoke(main, ["runs", "show", str(run_id)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "[EMAIL]" in line)
    assert row.split()[-2:] == ["99x", "31x"]
    assert "Monte Carlo would need about 990 samples for the same standard errors: 99x the 10 drawn, 31x the time" \
        in result.output
    data = json.loads(CliRunner().invoke(main, ["runs", "show", str(run_id), "--format", "json"]).output)
    assert data["report"]["aggregate"]["mc_sample_ratio"] == 99.0
    assert data["report"]["timing"]["aggregate"]["mc_time_ratio"] == 31.0


def test_show_without_the_figures(db):
    result = CliRunner().invoke(main, ["runs", "show", str(db["ok"])])
    row = next(line for line in result.output.splitlines() if "[EMAIL]" in line)
    assert row.split()[-3:] == ["yes", "-", "-"]


def test_show_unknown_run_exits_2(db):
    result = CliRunner().invoke(main, ["runs", "show", "999"])
    assert result.exit_code == 2 and "no run with id 999" in result.output


def test_database_from_the_config_file(db, tmp_path, monkeypatch):
    monkeypatch.delenv("TAILMON_DATABASE_URL")
    other = tmp_path / "other.db"
    Store(f"sqlite:///{other}").open().close()  # the daemon of that config has started once
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"database: sqlite:///{other}\nmonitors:\n  - name: x\n    prompts: {{type: file, path: p.jsonl}}\n"
                   "    judge: prefix:Sure\n    estimator: {method: mc}\n    schedule: {every: 1h}\n")
    result = CliRunner().invoke(main, ["runs", "list", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "no runs"


def test_unreachable_database_exits_3(monkeypatch):
    monkeypatch.delenv("TAILMON_CONFIG", raising=False)
    monkeypatch.setenv("TAILMON_DATABASE_URL", "postgresql://u:hunter2@127.0.0.1:9/x")
    result = CliRunner().invoke(main, ["runs", "list"])
    assert result.exit_code == 3
    assert "127.0.0.1:9" in result.output and "hunter2" not in result.output
