"""What `Store.finish_run` writes: run columns, estimate and sample rows from a report, redacted.

Everything is converted and checked here, before the transaction that closes the run opens.
"""

from __future__ import annotations

from tailmon.errors import InputError
from tailmon.redact import mask_settings, redact
from tailmon.store.values import as_bool, as_float, as_int


def redacted_report(report: dict) -> dict:
    """The report to store: per-prompt texts and categories and the system prompt through redact(),
    credentials masked everywhere (a judge's endpoint URL is in its spec)."""
    out = mask_settings(report)
    out["estimates"] = [{**e, "prompt": redact(e["prompt"]), "category": _redacted(e.get("category"))}
                        for e in report["estimates"]]
    if isinstance(report.get("system_prompt"), str):
        out["system_prompt"] = redact(report["system_prompt"])
    agg = report.get("aggregate")
    if isinstance(agg, dict) and isinstance(agg.get("by_category"), dict):
        out["aggregate"] = {**agg, "by_category": {_redacted(k): v for k, v in agg["by_category"].items()}}
    return out


def redacted_settings(settings: dict) -> dict:
    """A run's settings to store: every credential masked (mask_settings: a database URL's
    password, a token in an endpoint's query string), and the deployed system prompt through
    redact() (it may carry the operator's contact details as production serves them)."""
    settings = mask_settings(settings)
    model = settings.get("model") if isinstance(settings, dict) else None
    if isinstance(model, dict) and isinstance(model.get("system_prompt"), str):
        return {**settings, "model": {**model, "system_prompt": redact(model["system_prompt"])}}
    return settings


def _redacted(value):
    # A category comes from the source's own field: free text, as personal as the prompt.
    return redact(value) if isinstance(value, str) else value


def report_rows(run_id: int, report: dict) -> tuple[dict, list[dict]]:
    """Run columns from `report` (EstimationReport.to_dict()) and one estimates row per prompt."""
    if not isinstance(report, dict) or not isinstance(report.get("estimates"), list) \
            or not isinstance(report.get("aggregate"), dict):
        raise InputError("report must be EstimationReport.to_dict(): a dict with 'estimates' and 'aggregate'")
    ests = report["estimates"]
    rows = []
    for i, e in enumerate(ests):
        if not isinstance(e, dict) or not isinstance(e.get("prompt"), str):
            raise InputError(f"report estimate {i} must be a dict with a 'prompt' string")
        rows.append({
            "run_id": run_id, "prompt_index": i, "prompt": redact(e["prompt"]),
            "category": _redacted(e.get("category")), "method": e.get("method"),
            "n_samples": as_int(e.get("n_samples"), f"estimate {i} n_samples"),
            "n_harmful": as_int(e.get("n_harmful"), f"estimate {i} n_harmful"),
            **{k: as_float(e.get(k), f"estimate {i} {k}") for k in ("p_hat", "ci_low", "ci_high", "ess",
                                                                     "ess_wh", "khat", "kl")},
            "reliable": as_bool(e.get("reliable")), "upper_bound_only": as_bool(e.get("upper_bound_only")),
            "warnings": list(e.get("warnings") or []),
        })

    agg = report["aggregate"]
    ess = [r["ess"] for r in rows if r["ess"] is not None]
    khat = [r["khat"] for r in rows if r["khat"] is not None]
    epw = agg.get("expected_per_window") or {}
    pany = agg.get("p_any_per_window") or {}
    worst = agg.get("worst_query") or {}
    columns = {
        "report": redacted_report(report),
        "method": report.get("method"),
        "n_prompts": as_int(agg.get("n_prompts", len(rows)), "aggregate n_prompts"),
        "n_samples": as_int(agg.get("n_samples"), "aggregate n_samples"),
        "n_harmful": as_int(agg.get("n_harmful"), "aggregate n_harmful"),
        **{k: as_float(agg.get(k), f"aggregate {k}") for k in ("p_hat", "ci_low", "ci_high", "std_error")},
        # The aggregate has no ESS or k-hat of its own (yet): take the worst prompt's.
        "ess": as_float(agg["ess"], "aggregate ess") if "ess" in agg else (min(ess) if ess else None),
        "khat": as_float(agg["khat"], "aggregate khat") if "khat" in agg else (max(khat) if khat else None),
        "reliable": as_bool(agg.get("reliable")),
        "volume": as_float(agg.get("volume"), "aggregate volume"),
        "window": agg.get("window"),
        "expected_per_window": as_float(epw.get("expected"), "expected_per_window"),
        "expected_ci_low": as_float(epw.get("ci_low"), "expected_per_window ci_low"),
        "expected_ci_high": as_float(epw.get("ci_high"), "expected_per_window ci_high"),
        "p_any_per_window": as_float(pany.get("p"), "p_any_per_window"),
        "p_any_ci_low": as_float(pany.get("ci_low"), "p_any_per_window ci_low"),
        "p_any_ci_high": as_float(pany.get("ci_high"), "p_any_per_window ci_high"),
        "worst_query_p": as_float(worst.get("p"), "worst_query p"),
    }
    return columns, rows


SAMPLE_KEYS = ("prompt_index", "response", "score", "log_weight", "component")
"""The keys of a sample dict, in and out."""


def sample_rows(run_id: int, samples: list[dict]) -> list[dict]:
    """One samples row per sample dict (keys SAMPLE_KEYS), the response redacted."""
    rows = []
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise InputError(f"sample {i} must be a dict with keys {', '.join(SAMPLE_KEYS)}")
        unknown = set(s) - set(SAMPLE_KEYS)
        if unknown:
            raise InputError(f"sample {i} has unknown keys {sorted(unknown)}; expected {', '.join(SAMPLE_KEYS)}")
        if s.get("prompt_index") is None or not isinstance(s.get("response"), str) or s.get("score") is None:
            raise InputError(f"sample {i} needs prompt_index, response (a string) and score")
        rows.append({
            "run_id": run_id,
            "prompt_index": as_int(s["prompt_index"], f"sample {i} prompt_index"),
            "response": redact(s["response"]),
            # Range checks are the database's (ck_samples_score, NOT NULL): an out-of-range or nan
            # score fails the whole close, as any other bad row would.
            "score": as_float(s["score"], f"sample {i} score", keep_inf=True),
            "log_weight": as_float(s.get("log_weight"), f"sample {i} log_weight", keep_inf=True),
            "component": as_int(s.get("component"), f"sample {i} component"),
        })
    return rows
