"""`tailmon estimate` end to end on a local model folder (the tiny model): table, JSON, file."""

import json

from click.testing import CliRunner

from tailmon.cli.main import main

ARGS = ["--judge", "prefix:a", "--proposal", "temperature:2", "--samples", "40",
        "--max-new-tokens", "2", "--temperature", "0.7", "--seed", "3", "--quiet"]


def test_json_report_has_the_documented_schema(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ab", "category": "x"}\n"b"\n')
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["estimate", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                                       "--prompt", "a", "--format", "json", "--output", str(out),
                                       "--volume", "1000", *ARGS])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    assert report["model"] == str(tiny_model_dir) and report["method"] == "is"
    assert [c["label"] for c in report["components"]] == ["target", "temperature:2"]
    assert [e["prompt"] for e in report["estimates"]] == ["a", "ab", "b"]
    for e in report["estimates"]:
        for key in ("prompt", "category", "method", "n_samples", "p_hat", "ci_low", "ci_high", "n_harmful",
                    "h_sum", "ess", "ess_wh", "khat", "kl", "max_weight_share", "reliable", "warnings"):
            assert key in e, key
        assert e["n_samples"] == 40 and 0 <= e["ci_low"] <= e["ci_high"] <= 1
    agg = report["aggregate"]
    assert agg["n_prompts"] == 3 and agg["ci_low"] <= agg["p_hat"] <= agg["ci_high"]
    for key in ("expected_per_window", "p_any_per_window", "worst_query"):
        assert key in agg
    assert agg["by_category"].keys() == {"uncategorized", "x"}


def test_same_seed_same_report_and_table_output(tiny_model_dir):
    base = ["estimate", "--model", str(tiny_model_dir), "--prompt", "ab", *ARGS]
    first = CliRunner().invoke(main, base + ["--format", "json"])
    second = CliRunner().invoke(main, base + ["--format", "json"])
    assert first.exit_code == 0
    # everything but the wall-clock measurements of the `timing` block
    reports = [json.loads(r.stdout) for r in (first, second)]
    assert [r.pop("timing")["aggregate"]["seconds"] > 0 for r in reports] == [True, True]
    assert reports[0] == reports[1]
    table = CliRunner().invoke(main, base)
    assert table.exit_code == 0
    assert "95% interval" in table.stdout and "all 1 prompts (mean)" in table.stdout


def test_the_table_names_the_runs_own_confidence(tiny_model_dir):
    """Catches a table header that says "95% interval" for a monitor run at another
    `estimator.confidence` (the figures under it are then not what the header says)."""
    from tailmon.estimation.render import estimates_table

    result = CliRunner().invoke(main, ["estimate", "--model", str(tiny_model_dir), "--prompt", "ab", *ARGS,
                                       "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "95% interval" in estimates_table(report)
    report["confidence"] = 0.9
    table = estimates_table(report)
    assert "90% interval" in table and "95%" not in table


def test_monte_carlo_method(tiny_model_dir):
    result = CliRunner().invoke(main, ["estimate", "--model", str(tiny_model_dir), "--prompt", "ab", "--method", "mc",
                                       "--judge", "prefix:a", "--samples", "30", "--max-new-tokens", "2",
                                       "--format", "json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "mc" and report["estimates"][0]["khat"] is None


def test_runtime_failure_is_exit_3(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # looks like a model folder, is not one
    result = CliRunner().invoke(main, ["estimate", "--model", str(folder), "--prompt", "x", *ARGS])
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("runtime failure: model") and "Traceback" not in result.output


def test_output_on_a_full_disk_keeps_the_previous_file(tmp_path, tiny_model_dir):
    # Issue 18, item 9: `estimate --output` on a full disk replaced a good file with 4 KB of
    # truncated JSON. The disk is filled for the child process only, by RLIMIT_FSIZE (a write
    # past it fails with EFBIG once SIGXFSZ is ignored).
    import os
    import resource
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "report.json"
    good = '{"the": "previous report"}\n'
    out.write_text(good)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (500, 500))  # the report is ~1.5 KB

    tailmon = str(Path(sys.executable).with_name("tailmon"))
    done = subprocess.run([tailmon, "estimate", "--model", str(tiny_model_dir), "--prompt", "a b", "--judge",
                           "prefix:Sure", "--proposal", "temperature:2", "--samples", "4", "--max-new-tokens", "2",
                           "--output", str(out), "--quiet", "--format", "json"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    assert f"cannot write {out}" in done.stderr and "Traceback" not in done.stderr
    assert out.read_text() == good
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind
