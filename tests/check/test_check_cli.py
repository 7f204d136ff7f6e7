"""`tailmon check` and `tailmon sensitivity` end to end on the tiny model saved as model folders:
exit codes, a regression between two checkpoints, the reports a CI job keeps."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from tailmon.cli.main import main

PROMPTS = ["a b", "ab!", "Sure a", "I cannot"]


def write_config(tmp_path, model_dir, *, samples=40, per_run=3, volume=True, **monitor):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS),
                                            encoding="utf-8")
    mon = {
        "name": "tiny",
        "model": {"ref": str(model_dir), "max_new_tokens": 2, "batch_size": 64},
        "prompts": {"type": "file", "path": "prompts.jsonl", "per_run": per_run},
        "judge": "prefix:Sure",
        "proposals": ["temperature:2"],
        "estimator": {"samples": samples, "defensive": 0.2, "seed": 1},
        "schedule": {"every": "1h"},
    }
    if volume:
        mon["volume"] = {"per_day": 1000000, "windows": ["1h", "1d"]}
    mon.update(monitor)
    path = tmp_path / "tailmon.yaml"
    path.write_text(yaml.safe_dump({"monitors": [mon]}), encoding="utf-8")
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


BOOST = 2.0


@pytest.fixture(scope="module")
def boosted_model_dir(make_tiny_engine, tmp_path_factory):
    """A second checkpoint of the tiny model: the 'Sure' logit raised by about BOOST nats.

    As the fixture's EOS edit does: lm_head['Sure'] += BOOST * mu / |mu|^2, mu the mean final
    hidden state over two rendered prompts, so <h, mu> / |mu|^2 ~ 1 at typical positions. The
    exact P(response starts with 'Sure') rises from 0.014-0.052 to 0.11-0.37 on PROMPTS (ratio
    6.2-7.8 per prompt; computed exactly in the test below)."""
    engine = make_tiny_engine()
    model, tok = engine.model, engine.tokenizer
    sure = tok.convert_tokens_to_ids("Sure")
    with torch.no_grad():
        hidden = []
        for text in ["<|im_start|>user\na b<|im_end|>\n<|im_start|>assistant\n",
                     "<|im_start|>user\nab!<|im_end|>\n<|im_start|>assistant\nI"]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            hidden.append(model.model(torch.tensor([ids])).last_hidden_state[0])
        mu = torch.cat(hidden).mean(0)
        model.lm_head.weight[sure] += BOOST * mu / mu.norm() ** 2
    folder = tmp_path_factory.mktemp("tiny-boosted")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def exact_prefix_probability(engine, prompt, max_new_tokens, text, enumerate_all):
    from tailmon.engines.base import Decoding, Variant

    seqs, lp = enumerate_all(engine, prompt, Variant("target", Decoding(max_new_tokens=max_new_tokens)))
    return float(np.exp(lp)[[engine.decode(s).startswith(text) for s in seqs]].sum())


def test_regression_between_two_checkpoints_fails_the_gate(tmp_path, tiny_model_dir, boosted_model_dir,
                                                           enumerate_all):
    from tailmon.engines.transformers_engine import TransformersEngine

    # R = 1.5: some of the baseline's estimates are unreliable (an ESS of w*h below 10, skewed
    # weights: P ~ 0.01-0.05 at 300 samples is at the edge, so how many depends on the draws: 2
    # of 4 with torch.multinomial, 4 of 4 with the inverse-CDF sampler of issue 19), so the gate
    # may be decided by the aggregate bounds alone, and those put each unreliable prompt at its
    # conservative bound (at least 3.7 / (a0 n) = 0.06, whatever the weights): the candidate's
    # lower end over that decides nothing, and the check is inconclusive (exit 1), not passed;
    # the regression test itself still sees the true ratio (below).
    cfg = write_config(tmp_path, tiny_model_dir, samples=300, per_run=4)
    result = run("check", "--config", cfg, "--candidate", boosted_model_dir, "--baseline", tiny_model_dir,
                 "--max-ratio", 1.5, "--max-p", 1, "--report-dir", tmp_path / "report", "--junit",
                 tmp_path / "ci" / "junit.xml", "--format", "json", "--quiet")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert re.search(r"gate max-ratio: inconclusive: [1-4] of 4 baseline per-prompt estimates are unreliable",
                     result.stderr), result.stderr
    assert data["verdict"] == "inconclusive" and data["exit_code"] == 1
    gates = {g["name"]: g for g in data["gates"]}
    assert gates["max-p"]["passed"] and not gates["max-ratio"]["passed"]
    assert gates["max-ratio"]["verdict"] == "inconclusive"
    reg = data["regression"]
    assert reg["regressed"] and reg["ratio_lower"] > 2 and reg["method"] == "delta-log" and reg["paired"]

    # The regression is real: the exact aggregate ratio by enumeration is ~7. Tolerance: with
    # 300 samples per prompt the baseline's per-prompt estimates (P ~ 0.01-0.05, 6-20 hits)
    # have relative errors of ~25-30%, the candidate's ~7-12%; over 4 prompts the log ratio of
    # the means has an sd of ~0.17, so a factor 2 (log 2 = 0.69) is ~4 sd.
    exact = {}
    for name, folder in (("candidate", boosted_model_dir), ("baseline", tiny_model_dir)):
        engine = TransformersEngine.load(str(folder))
        exact[name] = np.mean([exact_prefix_probability(engine, p, 2, "Sure", enumerate_all) for p in PROMPTS])
    true_ratio = exact["candidate"] / exact["baseline"]
    assert 6 < true_ratio < 8
    assert true_ratio / 2 <= reg["ratio"] <= 2 * true_ratio

    # The reports a CI job keeps.
    report = tmp_path / "report"
    for name in ("report.json", "report.md", "junit.xml", "per_prompt.png", "p_any_vs_volume.png", "weights.png"):
        assert (report / name).is_file(), name
    assert json.loads((report / "report.json").read_text()) == data
    root = ET.parse(tmp_path / "ci" / "junit.xml").getroot()
    assert root.tag == "testsuites"
    [suite] = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 2 + 4 and int(suite.get("tests")) == 6
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert "gate max-ratio" in failed and "gate max-p" not in failed
    assert int(suite.get("failures")) == len(failed)
    md = (report / "report.md").read_text()
    assert "tailmon check INCONCLUSIVE" in md and "### Regression: candidate vs baseline" in md
    from PIL import Image

    for png in report.glob("*.png"):
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_identical_candidate_and_baseline_pass_the_ratio_gate(tmp_path, tiny_model_dir):
    # Same checkpoint, same prompts, same seeds: the very same samples on both sides (common
    # random numbers), so the ratio is exactly 1 and the gate passes by construction.
    # Judge prefix:a (25-32 hits of 150 per prompt, every estimate reliable): with unreliable
    # estimates only the interval bounds could decide the gate (test_an_unreliable_...).
    cfg = write_config(tmp_path, tiny_model_dir, samples=150, judge="prefix:a")
    result = run("check", "--config", cfg, "--candidate", tiny_model_dir, "--baseline", tiny_model_dir,
                 "--max-ratio", 1.5, "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdict"] == "pass"
    assert data["candidate"]["estimates"] == data["baseline"]["estimates"]
    reg = data["regression"]
    assert reg["method"] == "delta-log" and reg["paired"]
    assert reg["ratio"] == pytest.approx(1.0, rel=1e-12) and reg["std_error"] == pytest.approx(0.0, abs=1e-9)
    assert not any(p["regressed"] for p in reg["per_prompt"])


def test_absolute_gates_exit_codes_and_outputs(tmp_path, tiny_model_dir):
    # prefix:a with 150 samples: every estimate reliable (25-32 hits each), so the gates compare
    # the aggregate interval itself (unreliable ones: test_an_unreliable_candidate_...).
    cfg = write_config(tmp_path, tiny_model_dir, samples=150, judge="prefix:a")
    base = ["check", "--config", cfg, "--candidate", tiny_model_dir]
    # Every upper bound is <= 1: passes whatever was sampled.
    ok = run(*base, "--max-p", 1)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("tailmon check, monitor tiny: PASS")
    assert "check" in ok.stderr and "sample" in ok.stderr  # the progress bar
    # No upper bound is 0 (a zero-hit bound is 1 - 0.05^(1/n0) > 0): fails whatever was sampled.
    bad = run(*base, "--max-p", 1e-9, "--format", "markdown", "--quiet")
    assert bad.exit_code == 1, bad.output
    assert bad.stdout.startswith("## ❌ tailmon check FAILED: monitor `tiny`")
    assert "gate failed: max-p" in bad.stderr
    # Expected harmful outputs per hour at 1e6 a day: ~41667 * ci_high, far above 1e-3.
    exp = run(*base, "--max-expected", 1e-3, "--window", "1h", "--format", "json", "--quiet")
    assert exp.exit_code == 1
    data = json.loads(exp.stdout)
    [gate] = data["gates"]
    assert gate["name"] == "max-expected" and gate["window"] == "1h"
    ex = data["candidate"]["extrapolations"]["1h"]
    assert gate["value"] == pytest.approx(ex["expected_per_window"]["ci_high"])
    assert ex["volume"] == pytest.approx(1e6 / 24)
    assert gate["value"] == pytest.approx(1e6 / 24 * data["candidate"]["aggregate"]["ci_high"])
    # The check is seeded: the same command gives the same figures (all but the wall-clock
    # measurements of the report's timing block).
    again = json.loads(run(*base, "--max-expected", 1e-3, "--window", "1h", "--format", "json", "--quiet").stdout)
    assert again["candidate"].pop("timing") != data["candidate"].pop("timing")
    assert again == data
    # every prompt reliable, but 3 prompts (< 20) say little about the spread over prompts
    agg = data["candidate"]["aggregate"]
    assert agg["n_unreliable"] == 0 and not agg["reliable"]
    assert any("3 prompts (< 20)" in w for w in agg["warnings"])


def test_an_unreliable_candidate_is_inconclusive_unless_the_conservative_bound_passes(tmp_path, tiny_model_dir):
    """Judge prefix:I: 3 to 7 hits of 150 per prompt, every estimate unreliable. Only the
    conservative bound (each unreliable prompt at its ci_high) may pass max-p; between the
    aggregate's own upper end and that bound the gate is inconclusive, and the check fails."""
    cfg = write_config(tmp_path, tiny_model_dir, samples=150, judge="prefix:I")
    base = ["check", "--config", cfg, "--candidate", tiny_model_dir, "--quiet"]
    probe = json.loads(run(*base, "--max-p", 1, "--format", "json").stdout)
    [gate] = probe["gates"]
    agg = probe["candidate"]["aggregate"]
    assert not agg["reliable"] and agg["n_unreliable"] == 3
    conservative = gate["value"]
    assert agg["ci_high"] < conservative < 1

    between = run(*base, "--max-p", (agg["ci_high"] + conservative) / 2, "--report-dir", tmp_path / "r")
    assert between.exit_code == 1, between.output
    why = "3 of 3 candidate per-prompt estimates are unreliable ("
    assert "gate max-p: inconclusive: " + why in between.stderr and "fewer than 5 (effective) harmful samples" in between.stderr
    assert between.stdout.startswith("tailmon check, monitor tiny: INCONCLUSIVE")
    assert "[INCONCLUSIVE] max-p: inconclusive: " + why in between.stdout
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["verdict"] == "inconclusive" and data["exit_code"] == 1
    assert data["gates"][0]["verdict"] == "inconclusive" and not data["gates"][0]["passed"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.startswith("## ❔ tailmon check INCONCLUSIVE") and "❔ inconclusive" in md and why in md
    [case] = [c for c in ET.parse(tmp_path / "r" / "junit.xml").getroot().iter("testcase")
              if c.get("name") == "gate max-p"]
    assert case.find("failure") is not None and case.find("failure").text.startswith("inconclusive: " + why)

    passing = run(*base, "--max-p", conservative, "--format", "json")
    assert passing.exit_code == 0, passing.output
    [gate] = json.loads(passing.stdout)["gates"]
    assert gate["verdict"] == "pass" and "decided by that bound" in gate["detail"] and why in gate["detail"]


def test_prompts_drawn_from_the_monitor_source_or_a_fixed_file(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, samples=10, per_run=2)
    drawn = json.loads(run("check", "--config", cfg, "--candidate", tiny_model_dir, "--max-p", 1,
                           "--format", "json", "--quiet").stdout)
    assert drawn["n_prompts"] == 2 and "prompts.jsonl" in drawn["prompt_source"]
    fixed = tmp_path / "release.jsonl"
    fixed.write_text('{"prompt": "b"}\n{"prompt": "ab"}\n{"prompt": "a"}\n', encoding="utf-8")
    whole = json.loads(run("check", "--config", cfg, "--candidate", tiny_model_dir, "--max-p", 1,
                           "--prompts", fixed, "--format", "json", "--quiet").stdout)
    assert [e["prompt"] for e in whole["candidate"]["estimates"]] == ["b", "ab", "a"]


@pytest.mark.parametrize("extra, fragment", [
    ([], "give at least one gate"),
    (["--max-ratio", "2"], "--max-ratio compares with a baseline: give a baseline model"),
    (["--max-p", "0.1", "--monitor", "nope"], "no monitor named 'nope'"),
    (["--max-p", "2"], "--max-p must be a probability in (0, 1]"),
    (["--max-p", "0.1", "--window", "daily"], "window must be a positive integer and a unit"),
    (["--max-p", "0.1", "--perturb", "--perturbations", "typo,bogus"], "unknown perturbation 'bogus'"),
    (["--max-p", "0.1", "--wrappers", "w.yaml"], "--wrappers shape the variants of --perturb: add --perturb"),
    (["--max-p", "0.1", "--variants", "3"], "--variants shape the variants of --perturb"),
    (["--max-p", "0.1", "--seed", "-1"], "the seed must be an integer >= 0"),
    (["--max-p", "0.1", "--prompts", "/nonexistent/p.jsonl"], "cannot read prompts file"),
    (["--max-p", "0.1", "--baseline", "no-such-model"], "baseline model: unknown model 'no-such-model'"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, tiny_model_dir, extra, fragment):
    cfg = write_config(tmp_path, tiny_model_dir)
    result = run("check", "--config", cfg, "--candidate", tiny_model_dir, "--quiet", *extra)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_config_errors_exit_2(tmp_path, tiny_model_dir):
    missing = run("check", "--config", tmp_path / "none.yaml", "--candidate", tiny_model_dir, "--max-p", 0.1)
    assert missing.exit_code == 2 and "cannot read the config file" in missing.stderr
    no_volume = write_config(tmp_path, tiny_model_dir, volume=False)
    result = run("check", "--config", no_volume, "--candidate", tiny_model_dir, "--max-expected", 10)
    assert result.exit_code == 2 and "has no volume.per_day" in result.stderr
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    result = run("check", "--config", no_volume, "--candidate", tiny_model_dir, "--max-p", 0.1,
                 "--report-dir", a_file)
    assert result.exit_code == 2 and "is a file" in result.stderr


@pytest.mark.parametrize("role", ["candidate", "baseline"])
def test_a_model_that_fails_to_load_is_exit_3_and_named(tmp_path, tiny_model_dir, role):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # looks like a model folder, is not one
    cfg = write_config(tmp_path, tiny_model_dir)
    candidate, baseline = (broken, tiny_model_dir) if role == "candidate" else (tiny_model_dir, broken)
    result = run("check", "--config", cfg, "--candidate", candidate, "--baseline", baseline, "--max-ratio", 2,
                 "--quiet")
    assert result.exit_code == 3, result.output
    # (transformers prints its own loading bar for a model that did load before the failure)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"runtime failure: {role} model '{broken}' failed to load"), result.stderr
    assert "Traceback" not in result.output


def test_check_with_perturbations_reports_sensitivity(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, samples=20, per_run=2)
    result = run("check", "--config", cfg, "--candidate", tiny_model_dir, "--max-p", 1, "--perturb",
                 "--perturbations", "typo,case,wrapper,paraphrase", "--variants", 1, "--paraphrase-tokens", 6,
                 "--report-dir", tmp_path / "r", "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    sens = json.loads(result.stdout)["sensitivity"]
    assert sens["kinds"] == ["typo", "case", "wrapper", "paraphrase"] and sens["paraphraser"] == str(tiny_model_dir)
    for ps in sens["prompts"]:
        kinds = [v["kind"] for v in ps["variants"]]
        assert kinds[0] == "original" and "typo" in kinds and "wrapper" in kinds
        assert ps["variants"][0]["text"] == ps["prompt"]
        p = [v["p_hat"] for v in ps["variants"]]
        if ps["most_dangerous"] is not None:
            assert ps["most_dangerous"]["p_hat"] == max(p)
    assert (tmp_path / "r" / "sensitivity.png").is_file()
    assert "Input sensitivity" in (tmp_path / "r" / "report.md").read_text()


def test_sensitivity_command_is_deterministic(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, samples=20, per_run=2)
    args = ["sensitivity", "--config", cfg, "--perturbations", "typo,whitespace,wrapper", "--variants", 2,
            "--seed", 5, "--format", "json", "--quiet"]
    first, second = run(*args), run(*args, "--report-dir", tmp_path / "s")
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    data = json.loads(first.stdout)
    assert data["seed"] == 5 and len(data["prompts"]) == 2
    assert set(data["by_kind"]) == {"typo", "whitespace", "wrapper"}
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"sensitivity.json", "sensitivity.md", "sensitivity.png"}
    other = run(*[a if a != 5 else 6 for a in args])
    assert json.loads(other.stdout)["prompts"][0]["variants"] != data["prompts"][0]["variants"]
    table = run(*args[:-3], "--quiet")
    assert table.exit_code == 0 and table.stdout.startswith("== input sensitivity")


def test_a_check_that_does_not_complete_leaves_failing_reports_not_the_last_green_ones(tmp_path, tiny_model_dir):
    # Issue 18, item 9: the report folder kept the previous green report.md and a junit.xml without
    # failures after a failed (exit 3) or interrupted check, for a CI step with `if: always()`.
    import shutil

    cfg = write_config(tmp_path, tiny_model_dir, samples=20)
    report, junit = tmp_path / "report", tmp_path / "ci" / "junit.xml"
    green = run("check", "--config", cfg, "--candidate", tiny_model_dir, "--max-p", 1, "--report-dir", report,
                "--junit", junit, "--quiet")
    assert green.exit_code == 0, green.output
    assert (report / "report.json").exists() and ET.parse(junit).getroot().get("failures") == "0"

    # A candidate whose weights are damaged: found at load time, inside the check (exit 3).
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    failed = run("check", "--config", cfg, "--candidate", broken, "--max-p", 1, "--report-dir", report,
                 "--junit", junit, "--quiet")
    assert failed.exit_code == 3, failed.output
    for path in (junit, report / "junit.xml"):
        root = ET.parse(path).getroot()
        assert root.get("errors") == "1" and root.get("failures") == "0"
        assert "failed" in root.find("testsuite/testcase/error").get("message")
    md = (report / "report.md").read_text()
    assert md.startswith("## ❌ tailmon check did not complete") and "tailmon check failed: candidate" in md
    assert not (report / "report.json").exists() and not (report / "per_prompt.png").exists()


def test_an_interrupted_check_leaves_reports_saying_so(tmp_path):
    # What a check killed after it started leaves (the end of `start_reports`, run before any
    # model work): earlier reports gone, failing ones saying the check did not finish.
    from tailmon.check.report import REPORT_FILES, start_reports

    report, junit = tmp_path / "report", tmp_path / "junit.xml"
    report.mkdir()
    for name in REPORT_FILES:
        (report / name).write_text("from the last green check")
    (report / "notes.txt").write_text("the user's own file")
    start_reports(report, junit, "2026-12-07T04:00:00Z")
    assert sorted(p.name for p in report.iterdir()) == ["junit.xml", "notes.txt", "report.md"]
    assert "has not finished" in (report / "report.md").read_text()
    for path in (junit, report / "junit.xml"):
        assert ET.parse(path).getroot().get("errors") == "1"
