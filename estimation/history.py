"""A monitor's evidence over its stored runs: the series' pooled estimate and its change detector
(issue 20; the statistics are `tailmon.estimators.pooling`).

A **series** is one estimand: the monitor's model version (the store's `model_version`, which
changes with the checkpoint's files, its tokenizer and chat template among them, or its hub
revision) and, from the run's stored settings, the judge, the deployed decoding and system prompt
and the prompt source (not `per_run`: how many prompts a run draws changes the precision, not
what is estimated). The runs of the newest series that started within the horizon of the newest
run pool into one estimate. The change detector replays the whole series (deterministic, so a
restarted daemon carries on): armed from the start with the previous model version's pooled
history when only the version changed, otherwise calibrated on the series' first runs.

Everything here works on the store's plain rows and reports, so the daemon and `tailmon check`
share it without this package importing the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from tailmon.errors import InputError
from tailmon.estimators.pooling import Reference, arm, detect, pool
from tailmon.estimators.result import Estimate

_MODEL_KEYS = ("system_prompt", "temperature", "top_p", "top_k", "max_new_tokens")
_ESTIMATE_FIELDS = {f.name for f in dataclasses.fields(Estimate)}


@dataclass(frozen=True)
class HistorySettings:
    """A monitor's `pooling` block as numbers."""

    horizon: str = "7d"
    horizon_s: float = 7 * 86400.0
    change: bool = True
    factor: float = 2.0
    alpha: float = 0.01
    reference_runs: int = 4


def estimand(settings: Mapping | None) -> str:
    """What a run estimates apart from the checkpoint, as a short hash of its stored settings."""
    settings = settings or {}
    model = settings.get("model") or {}
    prompts = {k: v for k, v in (settings.get("prompts") or {}).items() if k != "per_run"}
    key = {"model": {k: model.get(k) for k in _MODEL_KEYS}, "judge": settings.get("judge"), "prompts": prompts}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def series_key(run: Mapping) -> tuple[str, int]:
    return estimand(run.get("settings")), int(run["model_version"])


def estimate_from_dict(d: Mapping) -> Estimate:
    """A stored per-prompt estimate (the report's `estimates` entry) back as an `Estimate`.

    JSON keeps non-finite numbers as null: a null standard error is an infinite one. Reports
    stored before a field existed get the field's meaning from what they have."""
    kw = {k: d[k] for k in _ESTIMATE_FIELDS if k in d}
    missing = [k for k in ("method", "n_samples", "p_hat", "ci_low", "ci_high", "n_harmful", "reliable")
               if kw.get(k) is None]
    if missing:
        raise InputError(f"a stored estimate lacks {', '.join(missing)}")
    kw["std_error"] = math.inf if kw.get("std_error") is None else kw["std_error"]
    kw.setdefault("h_sum", float(kw["n_harmful"]))
    kw.setdefault("n_hits_effective", kw["h_sum"])
    for k in ("ess", "ess_wh"):
        kw[k] = 0.0 if kw.get(k) is None else kw[k]
    for k in ("khat", "khat_wh", "kl", "max_weight_share", "self_normalised", "log_w_spread"):
        kw.setdefault(k, None)
    kw.setdefault("upper_bound_only", False)
    if kw.get("ci_high_conservative") is None:
        kw.pop("ci_high_conservative", None)
    kw["warnings"] = tuple(kw.get("warnings") or ())
    return Estimate(**kw)


class _Reports:
    """Reports read on demand, each once."""

    def __init__(self, load: Callable[[Sequence[int]], Mapping[int, dict]]):
        self._load, self._cache = load, {}

    def __call__(self, ids: Sequence[int]) -> list[dict]:
        need = [i for i in ids if i not in self._cache]
        if need:
            self._cache.update(self._load(need))
        lost = [i for i in ids if i not in self._cache]
        if lost:
            raise InputError(f"run(s) {', '.join(map(str, lost))} have no stored report")
        return [self._cache[i] for i in ids]


def _within(runs: Sequence[Mapping], horizon_s: float) -> list[Mapping]:
    end = runs[-1]["started_at"]
    return [r for r in runs if (end - r["started_at"]).total_seconds() <= horizon_s]


def _pool_runs(runs: Sequence[Mapping], reports: _Reports):
    reps = reports([r["id"] for r in runs])
    confidence = float(reps[-1].get("confidence") or 0.95)
    per_run = [[estimate_from_dict(e) for e in rep["estimates"]] for rep in reps]
    dicts = [e for rep in reps for e in rep["estimates"]]
    return pool(per_run, confidence), dicts


def _reference(runs: Sequence[Mapping], reports: _Reports, factor: float) -> Reference:
    pooled, _ = _pool_runs(runs, reports)
    return arm(pooled, [float(r["p_hat"]) for r in runs], factor)


def series_figures(runs: Sequence[Mapping], load_reports: Callable[[Sequence[int]], Mapping[int, dict]],
                   settings: HistorySettings = HistorySettings()) -> dict | None:
    """The `pooled` block of the newest of `runs` (a monitor's succeeded runs, oldest first, as
    `Store.series_runs` lists them; `load_reports(ids)` reads their reports): its series, the
    pooled estimate over the series' runs within the horizon with its MC-equivalent samples, and
    the change detector after it. None without runs."""
    if not runs:
        return None
    reports = _Reports(load_reports)
    key = series_key(runs[-1])
    series = [r for r in runs if series_key(r) == key]
    window = _within(series, settings.horizon_s)
    pooled, dicts = _pool_runs(window, reports)
    n_mc = [e.get("mc_equivalent_samples") for e in dicts]
    mc = None if any(v is None for v in n_mc) else float(sum(n_mc))
    out = {
        "series": {"estimand": key[0], "model_version": key[1], "model_ref": runs[-1].get("model_ref"),
                   "first_run": series[0]["id"], "runs": len(series)},
        "horizon": settings.horizon,
        "run_ids": [r["id"] for r in window],
        **pooled.to_dict(),
        "mc_equivalent_samples": mc,
        "mc_sample_ratio": None if mc is None else mc / pooled.n_samples,
        "change": None,
    }
    if settings.change:
        out["change"] = _change(runs, series, key, reports, settings)
    return out


def _change(runs, series, key, reports: _Reports, settings: HistorySettings) -> dict:
    """Replay the detector over the series; a series whose only difference from the one before it
    is the model version starts armed with that version's pooled history (within the horizon of
    its last run before this series began)."""
    initial, compared = None, None
    before = list(runs[:next(i for i, r in enumerate(runs) if r["id"] == series[0]["id"])])
    prev = before[-1] if before else None  # every run before the series' first has another key
    if prev is not None and series_key(prev)[0] == key[0]:
        prev_key = series_key(prev)
        history = _within([r for r in before if series_key(r) == prev_key], settings.horizon_s)
        initial = _reference(history, reports, settings.factor)
        compared = {"model_version": prev_key[1], "runs": len(history), "run_ids": [r["id"] for r in history]}

    def make(a: int, b: int) -> Reference:
        return _reference(series[a:b], reports, settings.factor)

    d = detect([float(r["p_hat"]) for r in series], settings.alpha, settings.reference_runs, make, initial)
    out = d.to_dict()
    out["alarms"] = [series[i]["id"] for i in d.alarms]  # run ids, not positions
    out.update({"alarm": d.status == "alarm", "factor": settings.factor, "alpha": settings.alpha,
                "reference_runs": settings.reference_runs, "compared_with": compared})
    if d.reference is not None and d.reference.bet == 0.0:
        out["warning"] = (f"the reference is too uncertain to show a {settings.factor:g}x rise (its upper bound "
                          "is too far above its runs): the detector cannot fire until a reference with more "
                          "runs or reliable estimates")
    return out


__all__ = ["HistorySettings", "estimand", "estimate_from_dict", "series_figures", "series_key"]
