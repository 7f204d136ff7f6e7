"""The reports of `tailmon check`: JSON (the estimate JSON's names), Markdown, JUnit XML a
standard parser reads, PNG plots that open. Real checks on the tiny engine, run in-process."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch

from tailmon.check.gate import GateOptions, model_settings, run_check, unreliable_side
from tailmon.check.report import render_junit, render_markdown, check_table, write_check_reports
from tailmon.monitor.config import parse_config
from tailmon.check.sensitivity import PerturbOptions
from tailmon.estimation.prompts import PromptItem

ESTIMATE_KEYS = {"prompt", "category", "method", "n_samples", "p_hat", "ci_low", "ci_high", "n_harmful", "h_sum",
                 "n_hits_effective", "khat_wh",
                 "ess", "ess_wh", "khat", "kl", "max_weight_share", "reliable", "warnings"}

# Prompts that stress the writers: markup, a pipe, an e-mail address (redacted in every report),
# a control character (not allowed in XML 1.0), a newline.
PROMPTS = [PromptItem("a b <x> & \"q\" | ab", "x"), PromptItem("mail me: jane.doe@example.com\x07 ab!", None),
           PromptItem("Sure a\nsecond line", "x")]


def monitor(method="is", volume=True):
    lines = ["monitors:", "  - name: rep", "    model: {ref: tiny, max_new_tokens: 2}",
             "    prompts: {type: file, path: p.jsonl}", '    judge: "prefix:Sure"',
             "    estimator: {samples: 60, defensive: 0.2, seed: 3, method: %s}" % method,
             "    schedule: {every: 1h}"]
    if method == "is":
        lines.append('    proposals: ["temperature:2"]')
    if volume:
        lines.append("    volume: {per_day: 100000, windows: [1h, 1d]}")
    return parse_config("\n".join(lines) + "\n").monitors[0]


@pytest.fixture(scope="module")
def boosted_engine(make_tiny_engine):
    """The tiny model with the 'Sure' logit raised (a riskier checkpoint; see test_check_cli)."""
    engine = make_tiny_engine()
    tok, model = engine.tokenizer, engine.model
    with torch.no_grad():
        ids = tok("<|im_start|>user\na b<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        mu = model.model(torch.tensor([ids])).last_hidden_state[0].mean(0)
        model.lm_head.weight[tok.convert_tokens_to_ids("Sure")] += 2.5 * mu / mu.norm() ** 2
    return engine


@pytest.fixture(scope="module")
def checked(tiny_engine, boosted_engine):
    """A check of the boosted candidate against the tiny baseline, with perturbations."""
    engines = {"candidate": boosted_engine, "baseline": tiny_engine}
    mon = monitor()
    return run_check(mon, PROMPTS, candidate=model_settings(mon, "candidate"), baseline=model_settings(mon, "baseline"),
                     seed=3, options=GateOptions(max_p=0.05, max_expected=1e9, window="1d", max_ratio=1.2),
                     perturb=PerturbOptions(kinds=("case", "wrapper"), per_kind=1, seed=3),
                     load=lambda mc, role, **_: engines[mc.ref], config_path="rep.yaml", prompt_source="test prompts")


def test_json_report_reuses_the_estimate_json_names(checked):
    data = checked.to_dict()
    text = json.dumps(data, allow_nan=False)  # plain JSON: no NaN or Infinity
    assert "jane.doe@example.com" not in text and "[EMAIL]" in text
    assert data["verdict"] == checked.verdict and checked.verdict in ("pass", "fail", "inconclusive")
    assert [g["name"] for g in data["gates"]] == ["max-p", "max-expected", "max-ratio"]
    for side in ("candidate", "baseline"):
        rep = data[side]
        assert rep["role"] == side and rep["model"] == side and rep["judge"] == "prefix:Sure"
        assert len(rep["estimates"]) == 3
        for e in rep["estimates"]:
            assert ESTIMATE_KEYS <= set(e)
        agg = rep["aggregate"]
        for key in ("p_hat", "ci_low", "ci_high", "n_prompts", "expected_per_window", "p_any_per_window",
                    "worst_query"):
            assert key in agg
        assert set(rep["extrapolations"]) == {"1h", "1d"}
        for ex in rep["extrapolations"].values():
            assert {"expected_per_window", "p_any_per_window", "worst_query", "volume", "window"} <= set(ex)
    max_p = data["gates"][0]
    unreliable = unreliable_side(checked.candidate.report, "candidate")
    # An unreliable candidate is gated on its conservative bound (unreliable prompts at ci_high).
    assert max_p["value"] == (data["candidate"]["aggregate"]["ci_high"] if unreliable is None
                              else unreliable.conservative_high)
    reg = data["regression"]
    assert {p["index"] for p in reg["per_prompt"]} == {1, 2, 3}
    assert reg["p_hat_candidate"] == pytest.approx(data["candidate"]["aggregate"]["p_hat"])
    assert len(data["prompt_flags"]) == 3
    assert data["sensitivity"]["kinds"] == ["case", "wrapper"]


def test_junit_is_read_by_a_standard_parser(checked):
    data = checked.to_dict()
    root = ET.fromstring(render_junit(data, elapsed_s=12.5))
    assert root.tag == "testsuites" and root.get("time") == "12.500"
    [suite] = root
    assert suite.tag == "testsuite" and suite.find("properties") is not None
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases[:3]] == ["gate max-p", "gate max-expected", "gate max-ratio"]
    assert len(cases) == 3 + len(PROMPTS)
    assert all(c.get("classname").startswith("tailmon.check.rep.") for c in cases)
    for case, gate in zip(cases, data["gates"]):
        assert (case.find("failure") is None) == gate["passed"]
    for case, flag in zip(cases[3:], data["prompt_flags"]):
        assert (case.find("failure") is not None) == bool(flag["failures"])
    failures = sum(c.find("failure") is not None for c in cases)
    assert int(suite.get("failures")) == int(root.get("failures")) == failures
    assert int(suite.get("tests")) == len(cases) and suite.get("errors") == "0"
    names = " ".join(c.get("name") for c in cases)
    assert "<x> &" in names and "[EMAIL]" in names and "\x07" not in names


def test_markdown_for_a_pull_request(checked):
    data = checked.to_dict()
    md = render_markdown(data, ["per_prompt.png"])
    mark = {"pass": "✅", "fail": "❌", "inconclusive": "❔"}[checked.verdict]
    assert md.startswith(f"## {mark} tailmon check")
    assert "| Gate | Threshold | Value | Result |" in md
    for g in data["gates"]:
        assert f"`{g['name']}`" in md
    assert "### Regression: candidate vs baseline" in md and "### Input sensitivity" in md
    assert "a b <x> & \"q\" \\| ab" in md  # the pipe cannot break the table
    assert "jane.doe" not in md and "Sure a second line" in md  # one line per cell
    assert "Plots: `per_prompt.png`" in md
    table = check_table(data)
    assert table.splitlines()[0] == f"tailmon check, monitor rep: {checked.verdict.upper()}"
    assert "== regression" in table and "most regressed prompts:" in table


def open_png(path):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()  # a truncated or corrupt file raises
    with Image.open(path) as im:
        im.load()
        return im.format, im.size


def test_report_directory_and_plots_open(checked, tmp_path):
    data = checked.to_dict()
    written = write_check_reports(checked, data, tmp_path / "out", tmp_path / "junit" / "j.xml", elapsed_s=1.0)
    names = {p.name for p in written}
    assert names == {"report.json", "report.md", "junit.xml", "per_prompt.png", "p_any_vs_volume.png",
                     "weights.png", "sensitivity.png", "j.xml"}
    assert (tmp_path / "junit" / "j.xml").read_bytes() == (tmp_path / "out" / "junit.xml").read_bytes()
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == data
    for p in written:
        if p.suffix == ".png":
            fmt, (w, h) = open_png(p)
            assert fmt == "PNG" and w >= 500 and h >= 400
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "out" / "per_prompt.png")
    assert img.ndim == 3 and img.std() > 0.01  # something was drawn


def test_plots_without_baseline_volume_or_weights(tiny_engine, tmp_path):
    # Plain Monte Carlo (no weights), no volume, no baseline, a judge nothing satisfies (all
    # zero estimates, shown as upper bounds on the log axis).
    mon = monitor(method="mc", volume=False).model_copy(update={"judge": "prefix:never"})
    result = run_check(mon, PROMPTS[:2], candidate=model_settings(mon, "tiny"), baseline=None, seed=1,
                       options=GateOptions(max_p=0.5), load=lambda mc, role, **_: tiny_engine)
    data = result.to_dict()
    assert all(e["p_hat"] == 0 for e in data["candidate"]["estimates"])
    assert data["candidate"]["extrapolations"] == {} and result.passed
    written = write_check_reports(result, data, tmp_path, None)
    for p in written:
        if p.suffix == ".png":
            assert open_png(p)[0] == "PNG"
    md = (tmp_path / "report.md").read_text()
    assert "- (no volume)" in md and "Regression" not in md
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert root.get("failures") == "0" and len(root.find("testsuite").findall("testcase")) == 3


def test_prompt_flags_need_evidence_not_doubt(checked):
    """A per-prompt JUnit case fails only when the prompt is shown to break a threshold."""
    for flag, r in zip(checked.prompt_flags(), checked.candidate.report.results):
        shown_above = r.estimate.ci_low > checked.options.max_p
        assert any("max-p" in f for f in flag["failures"]) == shown_above
    regressed = {p.index for p in checked.regression.per_prompt if p.regressed}
    assert {f["index"] for f in checked.prompt_flags() if any("regressed" in x for x in f["failures"])} == regressed
    assert not math.isnan(checked.regression.ratio_lower)
