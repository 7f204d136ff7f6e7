"""Reports of `tailmon check` and `tailmon sensitivity`: Markdown, text table, JUnit XML, PNG plots.

The text reports are rendered from the JSON dict of a check (`CheckResult.to_dict()`), so every
figure they show is one the JSON holds; the plots need the samples' weights as well and take
the result objects. Plots use matplotlib's Agg canvas directly (no pyplot, no global backend
state), so they render on a head-less CI machine and from any thread.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from tailmon.errors import InputError, RuntimeFailure
from tailmon.estimation.render import estimates_table
from tailmon.estimators import khat_threshold, p_any_per_window
from tailmon.estimators.importance import MIN_ESS_WH
from tailmon.paths import write_atomically

PLOT_FILES = {
    "per_prompt": "per_prompt.png",
    "p_any": "p_any_vs_volume.png",
    "weights": "weights.png",
    "sensitivity": "sensitivity.png",
}


# --- small formatting helpers ----------------------------------------------------------------------


def _sci(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return "0" if x == 0 else f"{x:.3g}"


def _short(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _cell(text: str, width: int = 60) -> str:
    """A Markdown table cell: one line, pipes escaped, backticks kept out of code spans."""
    return _short(text, width).replace("|", "\\|")


def _ratio_text(value, infinite: bool) -> str:
    if infinite:
        return "inf"
    return _sci(value)


def _p_shown(e: dict) -> str:
    return ("≤ " + _sci(e["ci_high"])) if e.get("upper_bound_only") else _sci(e["p_hat"])


def _side_window(side: dict, window: str) -> dict | None:
    return (side.get("extrapolations") or {}).get(window)


# --- Markdown --------------------------------------------------------------------------------------


_GATE_MARK = {"pass": "✅ pass", "fail": "❌ fail", "inconclusive": "❔ inconclusive"}


def render_markdown(data: dict, plots: Sequence[str] = ()) -> str:
    """A check report fit for a pull-request comment."""
    cand, base = data["candidate"], data.get("baseline")
    window = data["thresholds"]["window"]
    level = f"{data['confidence']:.0%}"
    headline = {"pass": "✅ tailmon check passed", "fail": "❌ tailmon check FAILED",
                "inconclusive": "❔ tailmon check INCONCLUSIVE (a failure)"}[data["verdict"]]
    out = [f"## {headline}: monitor `{data['monitor']}`", ""]
    sp = cand.get("system_prompt")
    who = f"Candidate `{cand['model']}`" + (f" with system prompt “{_cell(sp, 80)}”" if sp else "")
    if base:
        who += f", baseline `{base['model']}`"
    d = cand["decoding"]
    out.append(f"{who}. Judge `{cand['judge']}`; {data['n_prompts']} prompts ({_cell(data['prompt_source'], 80)}) "
               f"× {cand['n_samples']} samples, method `{cand['method']}`, seed {data['seed']}; decoding T={d['temperature']:g}, "
               f"top_p={d['top_p']:g}, top_k={d['top_k']}, max_new_tokens={d['max_new_tokens']}. "
               f"Intervals and bounds at {level}.")
    out += ["", "| Gate | Threshold | Value | Result |", "|---|---|---|---|"]
    for g in data["gates"]:
        value = "inf" if g["value"] is None and g["name"] == "max-ratio" else _sci(g["value"])
        out.append(f"| `{g['name']}`: {_cell(g['detail'], 200)} | {_sci(g['threshold'])} | {value} | "
                   f"{_GATE_MARK[g['verdict']]} |")
    out += ["", "### Risk", "",
            f"| | P(harm) per query | {level} interval | expected per {window} | P(≥1 per {window}) | worst query | reliable |",
            "|---|---|---|---|---|---|---|"]
    for side in [cand] + ([base] if base else []):
        a = side["aggregate"]
        ex = _side_window(side, window)
        if ex:
            e, pa = ex["expected_per_window"], ex["p_any_per_window"]
            exp_txt = f"{_sci(e['expected'])} [{_sci(e['ci_low'])}, {_sci(e['ci_high'])}]"
            any_txt = f"{_sci(pa['p'])} [{_sci(pa['ci_low'])}, {_sci(pa['ci_high'])}]"
            worst = _sci(ex["worst_query"]["p"]) if ex.get("worst_query") else "-"
        else:
            exp_txt = any_txt = worst = "- (no volume)"
        k = a["n_unreliable"]
        rel = "yes" if a["reliable"] else (f"no ({k} prompt{'s' if k != 1 else ''})" if k else "no (over prompts)")
        out.append(f"| {side['role']} | {_sci(a['p_hat'])} | [{_sci(a['ci_low'])}, {_sci(a['ci_high'])}] | {exp_txt} | "
                   f"{any_txt} | {worst} | {rel} |")
    reg = data.get("regression")
    if reg:
        out += ["", "### Regression: candidate vs baseline", "", _regression_sentence(reg), ""]
        rows = [p for p in reg["per_prompt"]]
        out += ["| # | prompt | candidate | baseline | ratio | lower bound | regressed |", "|---|---|---|---|---|---|---|"]
        for p in rows[:10]:
            out.append(f"| {p['index']} | {_cell(p['prompt'])} | {_sci(p['p_hat_candidate'])} | {_sci(p['p_hat_baseline'])} | "
                       f"{_ratio_text(p['ratio'], p['ratio_is_infinite'])} | "
                       f"{_ratio_text(p['ratio_lower'], p['ratio_lower_is_infinite'])} | "
                       f"{'**yes**' if p['regressed'] else 'no'} |")
        if len(rows) > 10:
            out.append(f"\n{len(rows) - 10} more prompts in the JSON report.")
    out += ["", "<details><summary>Per-prompt estimates</summary>", "", _estimates_table(data), "", "</details>"]
    sens = data.get("sensitivity")
    if sens:
        out += ["", sensitivity_markdown(sens, heading="###")]
    warnings = list(data.get("warnings") or [])
    for side in [cand] + ([base] if base else []):
        warned = sorted({w for e in side["estimates"] for w in e["warnings"]})
        warnings += [f"{side['role']}: {w}" for w in warned]
    if warnings:
        out += ["", "### Warnings", ""] + [f"- {_short(w, 300)}" for w in warnings]
    if plots:
        out += ["", "Plots: " + ", ".join(f"`{Path(p).name}`" for p in plots)]
    return "\n".join(out) + "\n"


def _regression_sentence(reg: dict) -> str:
    level = f"{reg['confidence']:.0%}"
    ratio = "undefined (no harmful sample on either side)" if reg["ratio"] is None and not reg["ratio_is_infinite"] \
        else _ratio_text(reg["ratio"], reg["ratio_is_infinite"])
    low = _ratio_text(reg["ratio_lower"], reg["ratio_lower_is_infinite"])
    text = f"Risk ratio candidate/baseline **{ratio}**, one-sided {level} lower bound **{low}**"
    if reg["max_ratio"] is not None:
        text += f" (gate: fail above {reg['max_ratio']:g}"
        if reg["p_value"] is not None:
            text += f"; p-value of ratio ≤ {reg['max_ratio']:g}: {reg['p_value']:.3g}"
        text += ")"
    text += ". "
    if reg["method"] == "delta-log":
        q = f"t quantile with {reg['df']} df" if reg["df"] is not None else "normal quantile"
        text += (f"Delta method on the log ratio, paired by prompt ({reg['variance_source']}-prompt variance, {q}"
                 f"{', common random numbers' if reg['paired'] else ''}).")
    else:
        text += ("Fewer than 5 effective hits on a side, so the bound is the candidate's lower interval end over "
                 "the baseline's upper end.")
    return text


def _estimates_table(data: dict) -> str:
    cand, base = data["candidate"], data.get("baseline")
    head = "| # | prompt | candidate P | interval | hits/n | ESS | k-hat | reliable |"
    sep = "|---|---|---|---|---|---|---|---|"
    if base:
        head += " baseline P | interval | reliable |"
        sep += "---|---|---|"
    rows = [head, sep]
    for i, e in enumerate(cand["estimates"]):
        ess = "-" if e["ess"] is None else f"{e['ess']:.0f}"
        khat = "-" if e["khat"] is None else f"{e['khat']:.2f}"
        row = (f"| {i + 1} | {_cell(e['prompt'])} | {_p_shown(e)} | [{_sci(e['ci_low'])}, {_sci(e['ci_high'])}] | "
               f"{e['n_harmful']}/{e['n_samples']} | {ess} | {khat} | {'yes' if e['reliable'] else 'no'} |")
        if base:
            b = base["estimates"][i]
            row += f" {_p_shown(b)} | [{_sci(b['ci_low'])}, {_sci(b['ci_high'])}] | {'yes' if b['reliable'] else 'no'} |"
        rows.append(row)
    return "\n".join(rows)


def sensitivity_markdown(sens: dict, heading: str = "##") -> str:
    out = [f"{heading} Input sensitivity (`{sens['model']}`)", "",
           f"Variants: {', '.join(sens['kinds'])}; {sens['variants_per_kind']} per kind, seed {sens['seed']}"
           + (f", paraphrases by `{sens['paraphraser']}`" if sens.get("paraphraser") else "")
           + ". Spread: largest over smallest estimate among a prompt's variants (a variant reported as an upper "
             "bound counts at that bound).", "",
           "| # | prompt | original P | most dangerous variant | its P | spread |", "|---|---|---|---|---|---|"]
    for i, ps in enumerate(sens["prompts"], 1):
        orig = ps["variants"][0]
        worst = ps["most_dangerous"]
        w_name = f"`{worst['name']}`" if worst else "- (no harmful sample)"
        w_p = _sci(worst["p_hat"]) if worst else "-"
        out.append(f"| {i} | {_cell(ps['prompt'])} | {_p_shown(orig)} | {w_name} | {w_p} | {_sci(ps['spread'])} |")
    out += ["", "| kind | variants | mean P | ratio to the originals |", "|---|---|---|---|"]
    for kind, row in sens["by_kind"].items():
        out.append(f"| {kind} | {row['n_variants']} | {_sci(row['p_hat_mean'])} | {_sci(row['ratio_to_original'])} |")
    return "\n".join(out)


def render_sensitivity_report(sens: dict) -> str:
    """A stand-alone Markdown report of `tailmon sensitivity`."""
    out = [sensitivity_markdown(sens), "", "<details><summary>Every variant</summary>", "",
           "| # | variant | text | P | interval | hits/n | reliable |", "|---|---|---|---|---|---|---|"]
    for i, ps in enumerate(sens["prompts"], 1):
        for v in ps["variants"]:
            out.append(f"| {i} | `{v['name']}` | {_cell(v['text'], 80)} | {_p_shown(v)} | "
                       f"[{_sci(v['ci_low'])}, {_sci(v['ci_high'])}] | {v['n_harmful']}/{v['n_samples']} | "
                       f"{'yes' if v['reliable'] else 'no'} |")
    out += ["", "</details>"]
    return "\n".join(out) + "\n"


# --- plain text (stdout) ---------------------------------------------------------------------------


def check_table(data: dict) -> str:
    cand, base = data["candidate"], data.get("baseline")
    lines = [f"tailmon check, monitor {data['monitor']}: {data['verdict'].upper()}"]
    for g in data["gates"]:
        lines.append(f"  [{'pass' if g['passed'] else g['verdict'].upper()}] {g['name']}: {g['detail']}")
    lines += ["", "== candidate", estimates_table(cand)]
    if base:
        lines += ["", "== baseline", estimates_table(base)]
    reg = data.get("regression")
    if reg:
        lines += ["", "== regression", _regression_sentence(reg).replace("**", "")]
        top = [p for p in reg["per_prompt"] if p["ratio"] is not None or p["ratio_is_infinite"]][:5]
        if top:
            lines.append("most regressed prompts:")
            for p in top:
                lines.append(f"  #{p['index']} {_short(p['prompt'], 50)}: {_sci(p['p_hat_candidate'])} vs "
                             f"{_sci(p['p_hat_baseline'])}, ratio {_ratio_text(p['ratio'], p['ratio_is_infinite'])} "
                             f"(lower bound {_ratio_text(p['ratio_lower'], p['ratio_lower_is_infinite'])})"
                             + ("  REGRESSED" if p["regressed"] else ""))
    if data.get("sensitivity"):
        lines += ["", sensitivity_table(data["sensitivity"])]
    if data.get("warnings"):
        lines += ["", "warnings:"] + [f"  {w}" for w in data["warnings"]]
    return "\n".join(lines)


def sensitivity_table(sens: dict) -> str:
    lines = [f"== input sensitivity ({sens['model']}; {', '.join(sens['kinds'])}; {sens['variants_per_kind']} per kind)"]
    for i, ps in enumerate(sens["prompts"], 1):
        worst = ps["most_dangerous"]
        lines.append(f"#{i} {_short(ps['prompt'], 50)}: original {_p_shown(ps['variants'][0])}, spread "
                     f"{_sci(ps['spread'])}, most dangerous "
                     + (f"{worst['name']} ({_sci(worst['p_hat'])})" if worst else "- (no harmful sample)"))
        for v in ps["variants"][1:]:
            lines.append(f"    {v['name']:<28} {_p_shown(v):>12}  [{_sci(v['ci_low'])}, {_sci(v['ci_high'])}]")
    return "\n".join(lines)


# --- JUnit XML -------------------------------------------------------------------------------------

# XML 1.0 forbids most control characters; a prompt may hold them.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _x(text) -> str:
    return _XML_BAD.sub("?", str(text))


def render_junit(data: dict, elapsed_s: float = 0.0) -> bytes:
    """JUnit XML: testsuites/testsuite/testcase[/failure]. One test case per gate (these decide
    the exit code) and one per prompt, failing when that prompt alone is shown to break a
    threshold (`CheckResult.prompt_flags`: its lower bound above max-p, or a regression beyond
    max-ratio significant after Bonferroni)."""
    mon = data["monitor"]
    cases = []
    for g in data["gates"]:  # an inconclusive gate fails: its detail says "inconclusive" and why
        cases.append(("tailmon.check." + mon + ".gates", f"gate {g['name']}", g["detail"],
                      None if g["passed"] else g["detail"]))
    cand = data["candidate"]
    base = data.get("baseline")
    for flag in data["prompt_flags"]:
        i = flag["index"]
        e = cand["estimates"][i - 1]
        out = (f"candidate P(harm) {_p_shown(e)} [{_sci(e['ci_low'])}, {_sci(e['ci_high'])}], "
               f"{e['n_harmful']}/{e['n_samples']} harmful samples, reliable {e['reliable']}")
        if base:
            b = base["estimates"][i - 1]
            out += f"; baseline {_p_shown(b)} [{_sci(b['ci_low'])}, {_sci(b['ci_high'])}]"
        failure = "; ".join(flag["failures"]) or None
        cases.append(("tailmon.check." + mon + ".prompts", f"prompt {i}: {_short(e['prompt'], 80)}", out, failure))
    failures = sum(1 for c in cases if c[3])
    root = ET.Element("testsuites", name="tailmon check", tests=str(len(cases)), failures=str(failures),
                      errors="0", time=f"{elapsed_s:.3f}")
    suite = ET.SubElement(root, "testsuite", name=f"tailmon check {mon}", tests=str(len(cases)),
                          failures=str(failures), errors="0", skipped="0", time=f"{elapsed_s:.3f}")
    props = ET.SubElement(suite, "properties")
    for name, value in [("candidate", cand["model"]), ("baseline", base["model"] if base else ""),
                        ("judge", cand["judge"]), ("seed", data["seed"]), ("verdict", data["verdict"])]:
        ET.SubElement(props, "property", name=name, value=_x(value))
    for classname, name, out, failure in cases:
        case = ET.SubElement(suite, "testcase", classname=_x(classname), name=_x(name), time="0")
        if failure:
            f = ET.SubElement(case, "failure", message=_x(_short(failure, 300)), type="tailmon.GateFailed")
            f.text = _x(failure)
        ET.SubElement(case, "system-out").text = _x(out)
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


# --- plots -----------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _floor(values: Sequence[float]) -> float:
    """The bottom of a log axis: a decade under the smallest positive value shown."""
    pos = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return 10 ** math.floor(math.log10(min(pos)) - 1) if pos else 1e-6


def _plot_estimates(ax, estimates: Sequence[dict], xs: np.ndarray, color: str, label: str, floor: float) -> None:
    """Points with intervals on a log axis; an estimate with no or few hits is a ▼ at its bound."""
    first = True
    for x, e in zip(xs, estimates):
        lo = max(e["ci_low"], floor)
        hi = max(e["ci_high"], floor)
        ax.vlines(x, lo, hi, color=color, lw=2, alpha=0.7)
        if e["upper_bound_only"] or e["p_hat"] <= 0:
            ax.plot([x], [hi], marker="v", ms=8, color=color, mfc="white", ls="", label=label if first else None)
        else:
            ax.plot([x], [e["p_hat"]], marker="o", ms=6, color=color, ls="", label=label if first else None)
        first = False


def plot_per_prompt(data: dict, path: Path) -> Path:
    cand, base = data["candidate"], data.get("baseline")
    sides = [(cand, "tab:red")] + ([(base, "tab:blue")] if base else [])
    m = len(cand["estimates"])
    fig = _figure(max(6.0, 0.6 * m + 3), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    values = [v for s, _ in sides for e in s["estimates"] for v in (e["p_hat"], e["ci_low"], e["ci_high"])]
    values += [v for s, _ in sides for v in (s["aggregate"]["ci_low"], s["aggregate"]["p_hat"])]
    if data["thresholds"].get("max_p"):
        values.append(data["thresholds"]["max_p"])
    floor = _floor(values)
    offset = 0.15 if base else 0.0
    for k, (side, color) in enumerate(sides):
        xs = np.arange(1, m + 1) + (-offset if k == 0 else offset)
        _plot_estimates(ax, side["estimates"], xs, color, f"{side['role']} ({_short(side['model'], 30)})", floor)
        a = side["aggregate"]
        agg = {"p_hat": a["p_hat"], "ci_low": a["ci_low"], "ci_high": a["ci_high"], "upper_bound_only": a["p_hat"] <= 0}
        _plot_estimates(ax, [agg], np.array([m + 1.0 + (-offset if k == 0 else offset)]), color, None, floor)
    if data["thresholds"].get("max_p"):
        ax.axhline(data["thresholds"]["max_p"], color="black", ls="--", lw=1, label="max-p (gate on the mean)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor, top=max(10 * floor, min(2.0, max(values) * 3)))
    ax.set_xticks(list(range(1, m + 2)))
    ax.set_xticklabels([str(i) for i in range(1, m + 1)] + ["mean"])
    ax.set_xlabel("prompt (numbers as in the report)")
    ax.set_ylabel(f"P(harmful response), {data['confidence']:.0%} interval")
    ax.set_title("Per-prompt harm probability" + (": candidate vs baseline" if base else ""))
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_p_any(data: dict, path: Path, volume_per_window: float | None = None) -> Path:
    """P(at least one harmful output) against the number of queries, with its interval band."""
    cand, base = data["candidate"], data.get("baseline")
    window = data["thresholds"]["window"]
    ex = _side_window(cand, window)
    if volume_per_window is None and ex:
        volume_per_window = ex["volume"]
    top = max(1e9, 100 * volume_per_window) if volume_per_window else 1e9
    volumes = np.logspace(0, math.log10(top), 120)
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for side, color in [(cand, "tab:red")] + ([(base, "tab:blue")] if base else []):
        agg = side["aggregate"]  # from P_query and its interval, as the reports' figure
        p, lo, hi = (min(max(agg[k], 0.0), 1.0) for k in ("p_hat", "ci_low", "ci_high"))
        mid = [p_any_per_window(p, v) for v in volumes]
        band_lo = [p_any_per_window(lo, v) for v in volumes]
        band_hi = [p_any_per_window(hi, v) for v in volumes]
        ax.plot(volumes, mid, color=color, label=f"{side['role']} ({_short(side['model'], 30)})")
        ax.fill_between(volumes, band_lo, band_hi, color=color, alpha=0.2)
    if volume_per_window:
        ax.axvline(volume_per_window, color="black", ls="--", lw=1, label=f"configured volume per {window}")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("queries")
    ax.set_ylabel("P(at least one harmful output)")
    ax.set_title(f"P(at least one harmful output) against query volume ({data['confidence']:.0%} band)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_weights(sides: Sequence, path: Path) -> Path:
    """Weight diagnostics per prompt: the log10 importance weights of the samples, k-hat against
    its reliability threshold, and the ESS of w*h against its minimum of 10. `sides` are
    `check.Side` objects (their reports hold the per-sample weights)."""
    fig = _figure(max(7.0, 0.5 * len(sides[0].report.results) + 5), 8.0)
    ax_w, ax_k, ax_e = fig.add_subplot(3, 1, 1), fig.add_subplot(3, 1, 2), fig.add_subplot(3, 1, 3)
    colors = ["tab:red", "tab:blue"]
    offset = 0.15 if len(sides) > 1 else 0.0
    any_weights = False
    for k, side in enumerate(sides):
        color = colors[k % 2]
        shift = -offset if k == 0 else offset
        results = side.report.results
        xs = np.arange(1, len(results) + 1) + shift
        for x, r in zip(xs, results):
            if r.log_weights is None:
                continue
            lw = np.asarray(r.log_weights)
            lw = lw[np.isfinite(lw)] / math.log(10)
            if lw.size:
                any_weights = True
                jitter = np.random.default_rng(0).uniform(-0.06, 0.06, lw.size)
                ax_w.plot(x + jitter, lw, ".", color=color, ms=2, alpha=0.4)
                harmful = np.asarray(r.scores)[np.isfinite(np.asarray(r.log_weights))] > 0
                if harmful.any():
                    ax_w.plot(x + jitter[harmful], lw[harmful], "x", color="black", ms=4)
        khat = [r.estimate.khat for r in results]
        ax_k.plot([x for x, v in zip(xs, khat) if v is not None], [v for v in khat if v is not None], "o",
                  color=color, label=side.role)
        ess = [max(r.estimate.ess_wh, 1e-2) for r in results]
        ax_e.plot(xs, ess, "o", color=color, label=side.role)
    n = sides[0].report.plan.n_samples
    ax_k.axhline(khat_threshold(n), color="black", ls="--", lw=1, label=f"threshold {khat_threshold(n):.2f}")
    ax_e.axhline(MIN_ESS_WH, color="black", ls="--", lw=1, label=f"minimum {MIN_ESS_WH:.0f}")
    ax_e.set_yscale("log")
    ax_w.set_ylabel("log10 weight")
    ax_w.set_title("Importance weights per sample (x: harmful samples)" if any_weights
                   else "Monte Carlo: every weight is 1")
    ax_k.set_ylabel("Pareto k-hat")
    ax_e.set_ylabel("ESS of w·h")
    ax_e.set_xlabel("prompt (numbers as in the report)")
    m = len(sides[0].report.results)
    for ax in (ax_w, ax_k, ax_e):
        ax.set_xticks(list(range(1, m + 1)))
        ax.set_xlim(0.5, m + 0.5)
        ax.grid(True, alpha=0.3)
    ax_k.legend(loc="best", fontsize=8)
    ax_e.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


_KIND_COLORS = {"original": "black", "typo": "tab:orange", "case": "tab:green", "whitespace": "tab:gray",
                "wrapper": "tab:red", "paraphrase": "tab:purple"}


def plot_sensitivity(sens: dict, path: Path) -> Path:
    """Every variant's estimate per prompt on a log scale, coloured by kind."""
    prompts = sens["prompts"]
    fig = _figure(max(6.0, 0.7 * len(prompts) + 4), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    values = [v for ps in prompts for e in ps["variants"] for v in (e["p_hat"], e["ci_high"])]
    floor = _floor(values)
    seen = set()
    for i, ps in enumerate(prompts, 1):
        for j, v in enumerate(ps["variants"]):
            x = i + (0.0 if v["kind"] == "original" else 0.3 * ((j % 7) / 6 - 0.5))
            color = _KIND_COLORS.get(v["kind"], "tab:brown")
            label = v["kind"] if v["kind"] not in seen else None
            seen.add(v["kind"])
            if v["upper_bound_only"] or v["p_hat"] <= 0:
                ax.plot([x], [max(v["ci_high"], floor)], marker="v", mfc="white", color=color, ls="", label=label)
            else:
                ax.plot([x], [v["p_hat"]], marker="o" if v["kind"] != "original" else "s", color=color, ls="",
                        label=label, ms=7 if v["kind"] == "original" else 5)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(list(range(1, len(prompts) + 1)))
    ax.set_xlabel("prompt (numbers as in the report)")
    ax.set_ylabel("P(harmful response)  (▼: upper bound)")
    ax.set_title(f"Input sensitivity ({_short(sens['model'], 40)})")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


# --- writing a report directory ----------------------------------------------------------------------


def prepare_dir(path: str | Path) -> Path:
    """Create the report directory (before any model work, so a bad path is a usage error)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create report directory {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise InputError(f"report directory {path} is not a directory")
    return path


# A check's own files in a report folder: cleared when a check starts, so that no file of an
# earlier check can be read as this one's.
REPORT_FILES = ("report.json", "report.md", "junit.xml", *PLOT_FILES.values())


def start_reports(report_dir: str | Path | None, junit: str | Path | None, started: str) -> None:
    """Before any model work: remove the previous check's reports and leave failing ones saying
    this check has not finished. A check that is interrupted, killed or crashes then leaves a
    failure for a CI step that posts the reports (`if: always()`), never the last green report."""
    if report_dir is not None:
        d = prepare_dir(report_dir)
        for name in REPORT_FILES:
            (d / name).unlink(missing_ok=True)
    write_failure_reports(report_dir, junit, f"tailmon check started at {started} and has not finished: it is "
                                             "still running, or it was interrupted or killed")


def write_failure_reports(report_dir: str | Path | None, junit: str | Path | None, reason: str) -> None:
    """report.md and junit.xml (in `report_dir` and at `junit`) of a check that did not complete."""
    reason = " ".join(str(reason).split())
    if report_dir is not None:
        _write(Path(report_dir) / "report.md", f"## ❌ tailmon check did not complete\n\n{reason}\n")
        _write(Path(report_dir) / "junit.xml", render_failed_junit(reason))
    if junit is not None:
        _write(Path(junit), render_failed_junit(reason))


def render_failed_junit(reason: str) -> bytes:
    """JUnit XML of a check that did not complete: one test case with an error."""
    root = ET.Element("testsuites", name="tailmon check", tests="1", failures="0", errors="1", time="0")
    suite = ET.SubElement(root, "testsuite", name="tailmon check", tests="1", failures="0", errors="1",
                          skipped="0", time="0")
    case = ET.SubElement(suite, "testcase", classname="tailmon.check", name="check completed", time="0")
    err = ET.SubElement(case, "error", message=_x(_short(reason, 300)), type="tailmon.CheckDidNotComplete")
    err.text = _x(reason)
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


def _write(path: Path, data: str | bytes) -> None:
    try:
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
    except OSError as exc:
        raise RuntimeFailure(f"cannot write {path}: {exc.strerror or exc}") from None


def write_check_reports(result, data: dict, report_dir: str | Path | None, junit: str | Path | None,
                        elapsed_s: float = 0.0) -> list[Path]:
    """report.json, report.md, junit.xml and the PNG plots in `report_dir`; the JUnit file also
    (or only) at `junit`. Returns the written paths. Each file is replaced at once (a full disk
    leaves the one `start_reports` wrote, which says the check did not complete); report.md and
    junit.xml, the files CI reads, come last."""
    written: list[Path] = []
    junit_xml = render_junit(data, elapsed_s)
    if report_dir is not None:
        d = prepare_dir(report_dir)
        plots = [plot_per_prompt(data, d / PLOT_FILES["per_prompt"]), plot_p_any(data, d / PLOT_FILES["p_any"])]
        sides = [result.candidate] + ([result.baseline] if result.baseline else [])
        plots.append(plot_weights(sides, d / PLOT_FILES["weights"]))
        if data.get("sensitivity"):
            plots.append(plot_sensitivity(data["sensitivity"], d / PLOT_FILES["sensitivity"]))
        _write(d / "report.json", json.dumps(data, indent=2, allow_nan=False))
        _write(d / "report.md", render_markdown(data, plots))
        _write(d / "junit.xml", junit_xml)
        written += [d / "report.json", d / "report.md", d / "junit.xml", *plots]
    if junit is not None:
        _write(Path(junit), junit_xml)
        written.append(Path(junit))
    return written


def write_sensitivity_reports(sens_dict: dict, report_dir: str | Path) -> list[Path]:
    d = prepare_dir(report_dir)
    plot = plot_sensitivity(sens_dict, d / PLOT_FILES["sensitivity"])
    (d / "sensitivity.json").write_text(json.dumps(sens_dict, indent=2, allow_nan=False), encoding="utf-8")
    (d / "sensitivity.md").write_text(render_sensitivity_report(sens_dict), encoding="utf-8")
    return [d / "sensitivity.json", d / "sensitivity.md", plot]
