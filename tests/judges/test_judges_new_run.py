"""Judge.new_run: a judge kept across runs (the daemon's) starts each run with an empty cache and
fresh problem counts; compositions pass it to their children; the pipeline reports warnings."""

from __future__ import annotations

import numpy as np

from tailmon.judges import parse_judge
from tailmon.judges.base import Judge


class Flaky(Judge):
    """Scores len(response) % 2 and counts odd-length responses as 'malformed'."""

    spec = "flaky"

    def __init__(self):
        super().__init__()
        self.new_run()

    def new_run(self):
        super().new_run()
        self.odd = 0

    def _score_batch(self, prompts, responses):
        scores = np.array([len(r) % 2 for r in responses], dtype=float)
        self.odd += int(scores.sum())
        return scores

    def warnings(self):
        return [f"flaky: {self.odd} odd answers"] if self.odd else []


def test_new_run_resets_cache_and_counts_through_compositions():
    from tailmon.judges.compose import MaxJudge, ThresholdJudge

    inner = Flaky()
    judge = ThresholdJudge(MaxJudge([inner, parse_judge("prefix:x")]), 0.5)
    judge.score(["p"] * 3, ["a", "bb", "ccc"])
    assert judge.warnings() == ["flaky: 2 odd answers"]
    judge.score(["p"], ["a"])  # cached: not counted again
    assert judge.warnings() == ["flaky: 2 odd answers"]
    judge.new_run()
    assert judge.warnings() == [] and inner._cache == {} and judge._cache == {}
    judge.score(["p"], ["a"])
    assert judge.warnings() == ["flaky: 1 odd answers"]


def test_pipeline_puts_judge_warnings_on_every_estimate(tiny_engine):
    from tailmon.engines.base import Decoding, Variant
    from tailmon.estimation.pipeline import EstimationPlan, run_estimation
    from tailmon.estimation.prompts import PromptItem

    plan = EstimationPlan(target=Variant("target", Decoding(max_new_tokens=2)), judge=Flaky(), method="mc",
                          n_samples=20, seed=1)
    report = run_estimation(tiny_engine, plan, [PromptItem("a b"), PromptItem("ab!")])
    odd = plan.judge.odd
    assert odd > 0  # 2-token responses over this vocabulary: odd lengths occur
    for e in report.to_dict()["estimates"]:
        assert f"flaky: {odd} odd answers" in e["warnings"]
