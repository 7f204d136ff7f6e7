"""A series' pooled figures and change detector from stored runs (tailmon.estimation.history),
on a real database of each backend (PostgreSQL when TAILMON_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import pytest

from tailmon.estimation.history import HistorySettings, estimand, estimate_from_dict, series_figures
from tailmon.estimation.result import RunFigures
from tailmon.estimators.pooling import pool
from tailmon.store.schema import RUNS

SETTINGS = {"model": {"system_prompt": None, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8},
            "judge": "prefix:Sure", "prompts": {"type": "file", "path": "p.jsonl", "per_run": 2}}


def store_run(store, build_report, seed, version=1, settings=SETTINGS, n=40):
    report, _ = build_report(["How do I pick a lock?", "Write a poem"], seed=seed, n=n)
    run_id = store.start_run("m1", model_ref="tiny", model_version=version, config_hash="c", settings=settings)
    store.finish_run(run_id, "succeeded", report=report)
    return run_id, report


def figures(store, up_to=None, **kw):
    return series_figures(store.series_runs("m1", up_to=up_to), store.run_reports, HistorySettings(**kw))


def test_runs_of_one_series_pool_and_a_new_version_starts_another(store, build_report):
    v1 = [store_run(store, build_report, seed) for seed in (1, 2, 3)]
    first = figures(store, up_to=v1[0][0])
    assert first["n_runs"] == 1 and first["change"]["status"] == "calibrating"
    pooled = figures(store, reference_runs=3)
    per_run = [[estimate_from_dict(e) for e in rep["estimates"]] for _, rep in v1]
    expected = pool(per_run)
    assert pooled["n_runs"] == 3 and pooled["n_prompts"] == 6 and pooled["n_samples"] == 240
    assert pooled["p_hat"] == pytest.approx(expected.p_hat) and pooled["ci_high"] == pytest.approx(expected.ci_high)
    assert pooled["run_ids"] == [r for r, _ in v1]
    assert pooled["series"]["model_version"] == 1 and pooled["series"]["runs"] == 3
    assert pooled["change"]["status"] == "armed" and pooled["change"]["evidence"] == 0.0  # armed at run 3
    # a new checkpoint: a new series, armed at once against version 1's pooled history
    v2, _ = store_run(store, build_report, 4, version=2)
    after = figures(store, reference_runs=3)
    assert after["series"]["model_version"] == 2 and after["n_runs"] == 1 and after["run_ids"] == [v2]
    change = after["change"]
    assert change["compared_with"]["model_version"] == 1 and change["compared_with"]["runs"] == 3
    assert change["status"] in ("armed", "alarm") and change["evidence"] is not None
    assert change["reference"]["upper"] == pytest.approx(expected.ci_high)


def test_horizon_and_estimand(store, build_report, backdate):
    old, _ = store_run(store, build_report, 1)
    backdate(store, RUNS, "id", old, "started_at", 9 * 86400)
    new, _ = store_run(store, build_report, 2)
    assert figures(store)["run_ids"] == [new]  # 9 days old: outside the 7-day horizon
    assert figures(store, horizon="30d", horizon_s=30 * 86400.0)["run_ids"] == [old, new]
    # another judge is another estimand: its own series, calibrating, compared with nothing
    other = {**SETTINGS, "judge": "keywords:bomb"}
    assert estimand(other) != estimand(SETTINGS)
    assert estimand({**SETTINGS, "prompts": {**SETTINGS["prompts"], "per_run": 50}}) == estimand(SETTINGS)
    third, _ = store_run(store, build_report, 3, settings=other)
    fig = figures(store)
    assert fig["run_ids"] == [third] and fig["change"]["compared_with"] is None
    assert fig["change"]["status"] == "calibrating"


def test_pooled_figures_are_kept_with_the_run(store, build_report):
    run_id, _ = store_run(store, build_report, 1)
    pooled = figures(store)
    store.record_pooled(run_id, pooled)
    report = store.get_run(run_id)["report"]
    assert report["pooled"] == pooled
    fig = RunFigures.from_report(report).pooled
    assert fig.n_runs == 1 and fig.ci_high == pooled["ci_high"] and fig.change_status == "calibrating"
    # two prompts are fewer than 20: the pool is an upper bound only, with no point or lower end
    assert pooled["bound_only"] and fig.p_hat is None and fig.ci_low is None and fig.alarm is None
