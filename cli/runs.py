"""`tailmon runs`: the stored runs."""

from __future__ import annotations

import json

import click

from tailmon.cli.errors import group
from tailmon.cli.options import config_option, open_store
from tailmon.errors import InputError
from tailmon.estimation.render import estimates_table, extrapolation_lines
from tailmon.redact import mask_secrets, mask_settings


@group()
def runs():
    """Inspect stored runs (database from --config, else $TAILMON_DATABASE_URL, else the default)."""


@runs.command("list")
@config_option
@click.option("--monitor", default=None, metavar="NAME", help="Only this monitor's runs.")
@click.option("--status", type=click.Choice(["running", "succeeded", "failed", "interrupted"]), default=None,
              help="Only runs in this state.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest runs shown at most.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="A table for people, or JSON for programs.")
def runs_list(config_path, monitor, status, limit, fmt):
    """The latest runs, newest first (their figures; `runs show` has a run's settings and estimates).

    Example: tailmon runs list --monitor assistant-prod --limit 5
    """
    store = open_store(config_path)
    try:
        rows = store.list_runs(monitor=monitor, status=status, limit=limit)
        # the series' pooled figures after each run live in its report (`runs show` has them whole)
        pooled = {i: rep.get("pooled") for i, rep in
                  store.run_reports([r["id"] for r in rows if r["status"] == "succeeded"]).items()}
    finally:
        store.close()
    if fmt == "json":
        # The settings (the whole monitor config, ~100 lines a run) are `runs show`'s to print.
        click.echo(json.dumps([{**{k: mask_secrets(v) if k == "error" else v for k, v in r.items() if k != "settings"},
                                "pooled": _pooled_summary(pooled.get(r["id"]))} for r in rows],
                              indent=2, default=str))
        return
    if not rows:
        click.echo("no runs")
        return
    click.echo(f"{'id':>6}  {'monitor':<20} {'status':<11} {'started':<25} {'p_hat':>10} {'ci_high':>10}  "
               f"{'reliable':<8}  {'pooled p':>10} {'pooled hi':>10} {'runs':>4}  change")
    for r in rows:
        p = "" if r.get("p_hat") is None else f"{r['p_hat']:.3g}"
        hi = "" if r.get("ci_high") is None else f"{r['ci_high']:.3g}"
        rel = "" if r.get("reliable") is None else ("yes" if r["reliable"] else "NO")
        pl = _pooled_summary(pooled.get(r["id"])) or {}
        pp = "" if not pl else ("bound" if pl["bound_only"] else f"{pl['p_hat']:.3g}")
        phi = "" if not pl else f"{pl['ci_high']:.3g}"
        runs_n = "" if not pl else str(pl["n_runs"])
        change = pl.get("change") or {}
        ch = "" if not change else ("ALARM" if change.get("alarm") else change["status"])
        click.echo(f"{r['id']:>6}  {r['monitor']:<20} {r['status']:<11} {str(r['started_at'])[:25]:<25} "
                   f"{p:>10} {hi:>10}  {rel:<8}  {pp:>10} {phi:>10} {runs_n:>4}  {ch}")


@runs.command("show")
@click.argument("run_id", type=int)
@config_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="A table for people, or JSON for programs.")
def runs_show(run_id, config_path, fmt):
    """One run: its status, timings, figures and per-prompt estimates.

    Example: tailmon runs show 42 --format json
    """
    store = open_store(config_path)
    try:
        run = store.get_run(run_id)
    finally:
        store.close()
    if run is None:
        raise InputError(f"no run with id {run_id}")
    # Runs stored before credentials were masked on the way in still hold them: masked on the way out.
    run = {**run, "settings": mask_settings(run.get("settings")), "error": mask_secrets(run.get("error"))}
    if fmt == "json":
        click.echo(json.dumps(run, indent=2, default=str))
        return

    click.echo(f"run {run['id']}: monitor {run['monitor']}, {run['status']}, model {run['model_ref']} "
               f"(version {run['model_version']}), started {run['started_at']}, finished {run.get('finished_at')}")
    if run.get("error"):
        click.echo(f"error: {run['error']}")
    if run.get("report"):
        click.echo(estimates_table(run["report"]))
        click.echo(extrapolation_lines(run["report"]))
        if run["report"].get("pooled"):
            click.echo(_pooled_lines(run["report"]["pooled"]))
        if run["report"].get("adaptive"):
            click.echo(_adaptive_lines(run["report"]["adaptive"]))


def _pooled_summary(pooled: dict | None) -> dict | None:
    """What `runs list --format json` gives of a run's pooled figures (`runs show` has them all)."""
    if not pooled:
        return None
    change = pooled.get("change")
    return {**{k: pooled.get(k) for k in ("n_runs", "n_prompts", "n_samples", "p_hat", "ci_low", "ci_high",
                                           "reliable", "bound_only", "mc_equivalent_samples")},
            "model_version": (pooled.get("series") or {}).get("model_version"),
            "change": None if not change else {k: change.get(k) for k in ("status", "evidence", "threshold", "alarm")}}


def _pooled_lines(p: dict) -> str:
    """The series' pooled estimate and the change detector after this run."""
    series = p.get("series") or {}
    conf = f"{p.get('confidence', 0.95):.0%}"
    figure = (f"P(harm) <= {p['ci_high']:.3g} (upper bound only: {p['n_unreliable']} unreliable prompt(s) or too "
              "few prompts / too uneven risk; see the warnings)" if p.get("bound_only")
              else f"P(harm) = {p['p_hat']:.3g}, {conf} interval [{p['ci_low']:.3g}, {p['ci_high']:.3g}]")
    mc = p.get("mc_equivalent_samples")
    lines = [f"pooled over {p['n_runs']} run(s) of model version {series.get('model_version')} within "
             f"{p.get('horizon')} ({p['n_prompts']} prompts, {p['n_samples']} samples"
             + (f", worth {mc:,.0f} Monte Carlo samples" if mc is not None else "") + f"): {figure}"]
    c = p.get("change")
    if c:
        against = c.get("compared_with")
        ref = c.get("reference")
        base = (f"against model version {against['model_version']}'s pooled history ({against['runs']} runs)"
                if against else "against the series' own reference runs")
        if c["status"] == "calibrating":
            lines.append(f"change detector: calibrating (pooling {c['reference_runs']} runs into its reference)")
        else:
            lines.append(f"change detector ({c['factor']:g}x rise, alpha {c['alpha']:g}) {base}, reference bound "
                         f"{ref['upper']:.3g}: evidence {c['evidence']:.3g} of {c['threshold']:g}"
                         + (": ALARM, risk rose above the reference; re-arming on the next runs" if c.get("alarm")
                            else ""))
        if c.get("warning"):
            lines.append(f"change detector: {c['warning']}")
    return "\n".join(lines)


def _adaptive_lines(a: dict) -> str:
    """What an adaptive monitor's run drew with, and what it learnt after."""
    adapter = f"adapter {a['adapter']}" if a.get("adapter") else "no adapter yet"
    tilt = f", tilt {a['tilt']}" if a.get("tilt") else ""
    share = f", target share {a['target_share']:g}" if a.get("target_share") is not None else ""
    lines = [f"adaptive proposal: generation {a['generation']}, {adapter}{tilt}{share}"
             + (" (trained on another checkpoint)" if a.get("checkpoint_changed") else "")]
    update = a.get("update")
    if update:
        held = update.get("held_out") or {}
        before, after = held.get("variance_before"), held.get("variance_after")
        figures = (f"; held-out variance {before:.3g} -> {after:.3g}"
                   if before is not None and after is not None else "")
        lines.append(f"after the run: generation {update['generation_before']} -> {update['generation_after']}: "
                     f"{update['reason']}{figures}")
    return "\n".join(lines)
