"""Human-readable renderings of an estimation report (the JSON dict of pipeline.EstimationReport)."""

from __future__ import annotations


def _sci(x) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.2e}"


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _worst(worst: dict, fmt: str) -> str:
    """The forecast and its interval (reports stored before the interval existed have only p)."""
    text = format(worst["p"], fmt)
    if worst.get("ci_low") is not None and worst.get("ci_high") is not None:
        text += f" [{format(worst['ci_low'], fmt)}, {format(worst['ci_high'], fmt)}]"
    return text


def _ratio(x) -> str:
    """An efficiency ratio (n_MC / n or MC time / IS time); "-" where none is reported."""
    return "-" if x is None else f"{x:.3g}x"


def estimates_table(report: dict, prompt_width: int = 44) -> str:
    # "MC samples" and "MC time": n_MC / n and its time counterpart (tailmon.estimation.efficiency),
    # shown only for reliable, non-zero estimates; reports stored before they existed show "-".
    # the interval's level is the run's own (estimator.confidence; reports without it are at 95%)
    level = f"{100 * float(report.get('confidence') or 0.95):g}% interval"
    rows = [("prompt", "p_hat", level, "hits/n", "ESS", "k-hat", "reliable", "MC samples", "MC time")]
    timing = report.get("timing") or {}  # absent from reports stored before it existed
    times = [t.get("mc_time_ratio") for t in timing.get("estimates") or [{}] * len(report["estimates"])]
    run_time_ratio = (timing.get("aggregate") or {}).get("mc_time_ratio")
    for e, time_ratio in zip(report["estimates"], times):
        shown = "≤ " + _sci(e["ci_high"]) if e["upper_bound_only"] else _sci(e["p_hat"])
        rows.append((
            _short(e["prompt"], prompt_width),
            shown,
            f"[{_sci(e['ci_low'])}, {_sci(e['ci_high'])}]",
            f"{e['n_harmful']}/{e['n_samples']}",
            f"{e['ess']:.0f}" if e["ess"] is not None else "-",
            f"{e['khat']:.2f}" if e["khat"] is not None else "-",
            "yes" if e["reliable"] else "NO",
            _ratio(e.get("mc_sample_ratio")),
            _ratio(time_ratio),
        ))
    agg = report["aggregate"]
    rows.append((
        f"all {agg['n_prompts']} prompts (mean)",
        _sci(agg["p_hat"]),
        f"[{_sci(agg['ci_low'])}, {_sci(agg['ci_high'])}]",
        f"{agg['n_harmful']}/{agg['n_samples']}",
        "", "",
        "yes" if agg["reliable"] else (f"NO ({agg['n_unreliable']})" if agg["n_unreliable"] else "NO (see warnings)"),
        _ratio(agg.get("mc_sample_ratio")),
        _ratio(run_time_ratio),
    ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        if k == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    comps = ", ".join(f"{c['label']} ({c['share']:.0%})" for c in report["components"])
    d = report["decoding"]
    head = [
        f"model {report['model']}  judge {report['judge']}  method {report['method']}",
        f"decoding T={d['temperature']:g} top_p={d['top_p']:g} top_k={d['top_k']} max_new_tokens={d['max_new_tokens']}",
        f"mixture {comps}" if report["method"] == "is" else "sampling the target only",
        "",
    ]
    tail = []
    share = agg.get("top_share")
    tail.append("")
    tail.append(f"interval over prompts: {agg.get('interval', 'normal')}"
                + (f"; the largest prompt carries {share:.0%} of the mean" if share is not None else "")
                + (f"; fitted spread of ln P over prompts {agg['log_spread']:.2f}" if agg.get("log_spread") is not None
                   else ""))
    if agg.get("mc_equivalent_samples") is not None:
        tail.append("")
        line = (f"Monte Carlo would need about {agg['mc_equivalent_samples']:.3g} samples for the same standard "
                f"errors: {_ratio(agg['mc_sample_ratio'])} the {agg['n_samples']} drawn")
        if run_time_ratio is not None:
            line += f", {_ratio(run_time_ratio)} the time"
        tail.append(line)
    elif report["method"] == "is":
        tail.append("")
        tail.append("MC samples/time: Monte Carlo samples (time) for the same standard error, per sample drawn "
                    "(time spent); shown for reliable non-zero estimates only")
    if "expected_per_window" in agg:
        ex, pa = agg["expected_per_window"], agg["p_any_per_window"]
        tail.append("")
        tail.append(f"at {agg['volume']:g} queries per {agg['window']}: expected harmful outputs "
                    f"{ex['expected']:.3g} [{ex['ci_low']:.3g}, {ex['ci_high']:.3g}], "
                    f"P(at least one) {pa['p']:.3g} [{pa['ci_low']:.3g}, {pa['ci_high']:.3g}]")
        worst = agg.get("worst_query")
        if worst:
            tail.append(f"worst-query forecast: largest P(x) among them about {_worst(worst, '.2e')} "
                        f"(tail fit on {worst['n_points']} prompts)")
        else:
            tail.append("worst-query forecast: not fitted (it needs at least 10 prompts with hits in the top quarter)")
    warned = [(i, w) for i, e in enumerate(report["estimates"], 1) for w in e["warnings"]]
    agg_warned = list(agg.get("warnings", [])) + list((agg.get("worst_query") or {}).get("warnings", []))
    if warned or agg_warned:
        tail.append("")
        tail.append("warnings:")
        for w in agg_warned:
            tail.append(f"  all prompts: {w}")
        seen = set()
        for i, w in warned:
            if w not in seen or "prompt" not in w:
                tail.append(f"  prompt {i}: {w}")
                seen.add(w)
    return "\n".join(head + lines + tail)


def extrapolation_lines(report: dict) -> str:
    lines = []
    shown = report["aggregate"].get("window")  # the table already has this window's line
    for window, ex in (report.get("extrapolations") or {}).items():
        if window == shown:
            continue
        e, a = ex["expected_per_window"], ex["p_any_per_window"]
        worst = ex.get("worst_query")
        lines.append(f"per {window} ({ex['volume']:.3g} queries): expected harmful outputs {e['expected']:.3g} "
                     f"[{e['ci_low']:.3g}, {e['ci_high']:.3g}], P(at least one) {a['p']:.3g} "
                     f"[{a['ci_low']:.3g}, {a['ci_high']:.3g}]"
                     + (f", worst query {_worst(worst, '.3g')}" if worst else ""))
    return "\n".join(lines)
