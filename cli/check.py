"""`tailmon check` (the release gate) and `tailmon sensitivity`: parse, call the library, exit.

Errors map to exit codes in `tailmon.cli.errors`: InputError 2 (one line), RuntimeFailure and
anything unexpected 3. A failed gate exits 1 here. Everything the user typed is checked before a model is loaded.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click
from click.core import ParameterSource

from tailmon.cli.errors import EXIT_FAILED, command
from tailmon.errors import InputError

_FORMATS = click.Choice(["table", "json", "markdown"])


def _pick_monitor(loaded, name: str | None):
    cfg = loaded.config
    if name is not None:
        return cfg.monitor(name)
    if len(cfg.monitors) == 1:
        return cfg.monitors[0]
    raise InputError(f"{loaded.path.name} has {len(cfg.monitors)} monitors: choose one with --monitor NAME "
                     f"({', '.join(m.name for m in cfg.monitors)})")


def _history(config_path, mon):
    """The monitor's pooled figures from its stored runs (the config's database), the baseline of
    --baseline-from-history; a usage error when there is none to compare with."""
    from tailmon.cli.options import open_store
    from tailmon.estimation.history import series_figures

    store = open_store(config_path)
    try:
        runs = store.series_runs(mon.name)
        pooled = series_figures(runs, store.run_reports, mon.history_settings())
    finally:
        store.close()
    if pooled is None:
        raise InputError(f"--baseline-from-history: monitor '{mon.name}' has no succeeded run in the database "
                         "to take a baseline from")
    return pooled


def _prompts(loaded, mon, prompts_file, seed):
    from tailmon.estimation.plan import draw_prompts
    from tailmon.estimation.prompts import load_prompts

    if prompts_file:
        # A release test set is used whole: every prompt of the file, in file order.
        return load_prompts(prompts_file), f"file {prompts_file}"
    return draw_prompts(mon, loaded.base_dir, seed)


def _perturb_options(kinds_text, variants, seed, wrappers_file, paraphraser_ref, paraphrase_tokens):
    """PerturbOptions with everything but a separate paraphrasing engine (loaded later, if any)."""
    from tailmon.check.sensitivity import PerturbOptions, load_wrappers, parse_kinds

    kinds = parse_kinds(kinds_text)
    if wrappers_file is not None and "wrapper" not in kinds:
        raise InputError("--wrappers is only used by wrapper variants: add 'wrapper' to --perturbations")
    if paraphraser_ref is not None and "paraphrase" not in kinds:
        raise InputError("--paraphraser is only used by paraphrase variants: add 'paraphrase' to --perturbations")
    wrappers = tuple(load_wrappers(wrappers_file)) if wrappers_file is not None else None
    return PerturbOptions(kinds=kinds, per_kind=variants, seed=seed, wrappers=wrappers,
                          paraphrase_tokens=paraphrase_tokens)


def _with_paraphraser(popts, paraphraser_ref, mon):
    """Attach the --paraphraser model's engine; without one, run_sensitivity has the model under
    test write the paraphrases."""
    from dataclasses import replace

    from tailmon.check.gate import load_model, paraphraser_settings
    from tailmon.check.sensitivity import Paraphraser

    if paraphraser_ref is None:
        return popts
    engine = load_model(paraphraser_settings(mon, paraphraser_ref), "paraphraser")
    return replace(popts, paraphraser=Paraphraser(engine, model_ref=paraphraser_ref,
                                                  max_new_tokens=popts.paraphrase_tokens))


def _seed(mon, seed: int | None) -> int:
    seed = mon.estimator.seed if seed is None else seed
    if seed < 0:  # numpy's SeedSequence, which every seed goes through, takes no negative numbers
        raise InputError(f"the seed must be an integer >= 0, got {seed} (--seed or estimator.seed of monitor "
                         f"'{mon.name}')")
    return seed


def _bar(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, disable=quiet, dynamic_ncols=True)


def _grow(bar):
    def add(n: int) -> None:
        bar.total = (bar.total or 0) + n
        bar.refresh()
    return add


_perturb_opts = [
    click.option("--perturbations", "kinds_text", default="all", show_default=True, metavar="LIST",
                 help="Comma-separated variant kinds: typo, case, whitespace, wrapper, paraphrase (or 'all')."),
    click.option("--variants", type=int, default=2, show_default=True,
                 help="Variants per kind and prompt (wrappers: how many of the library)."),
    click.option("--wrappers", "wrappers_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                 help="Wrapper library (YAML list of {name, template with {prompt}}); default: the shipped one."),
    click.option("--paraphraser", "paraphraser_ref", default=None, metavar="MODEL",
                 help="Model that writes the paraphrases (default: the model under test)."),
    click.option("--paraphrase-tokens", type=int, default=48, show_default=True,
                 help="Length cap of a generated paraphrase, in tokens."),
]


def perturb_options(f):
    for opt in reversed(_perturb_opts):
        f = opt(f)
    return f


@command("check")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Daemon config (YAML) whose monitor defines prompts, judge, proposals, estimator and volume. "
                   "Default: $TAILMON_CONFIG.")
@click.option("--monitor", "monitor_name", default=None, metavar="NAME",
              help="The monitor to check against (default: the config's only one).")
@click.option("--candidate", "candidate_ref", required=True, metavar="MODEL",
              help="The checkpoint to release: embedded name, local model folder, or hub id.")
@click.option("--candidate-system-prompt", default=None, metavar="TEXT",
              help="The system prompt the candidate will be deployed with (default: the monitor's).")
@click.option("--baseline", "baseline_ref", default=None, metavar="MODEL",
              help="The model in production, estimated on the same prompts and seeds for --max-ratio.")
@click.option("--baseline-from-history", "from_history", is_flag=True,
              help="With --max-ratio: the baseline is the monitor's stored history (its current series pooled "
                   "over the pooling horizon, from the config's database), not a model estimated here. Unpaired: "
                   "decided by interval ends.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A fixed test set, used whole (default: per_run prompts drawn from the monitor's source).")
@click.option("--max-p", type=float, default=None, metavar="P",
              help="Fail when the upper end of the 95% interval (a one-sided 97.5% bound) of P(harm) per query "
                   "exceeds P.")
@click.option("--max-expected", type=float, default=None, metavar="N",
              help="Fail when the upper end of the 95% interval (a one-sided 97.5% bound) of expected harmful outputs per "
                   "--window exceeds N.")
@click.option("--window", default="1d", show_default=True, help="Window of --max-expected: 1h, 1d, 7d, ...")
@click.option("--max-ratio", type=float, default=None, metavar="R",
              help="Fail when the candidate's risk exceeds R times the baseline's with 95% confidence.")
@click.option("--seed", type=int, default=None, help="Seed of the prompt draw and the sampling (default: the monitor's).")
@click.option("--report-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write report.md, report.json, junit.xml and PNG plots here.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the JUnit XML report to this file.")
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True, help="What to print on stdout.")
@click.option("--perturb", is_flag=True, help="Also estimate perturbed variants of every prompt on the candidate.")
@perturb_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def check(config_path, monitor_name, candidate_ref, candidate_system_prompt, baseline_ref, from_history, prompts_file,
          max_p, max_expected, window, max_ratio, seed, report_dir, junit_path, fmt, perturb, kinds_text, variants,
          wrappers_file, paraphraser_ref, paraphrase_tokens, quiet):
    """Release gate: estimate a candidate checkpoint with a monitor's plan and fail on excess risk.

    The candidate (and the --baseline) are estimated exactly as the daemon estimates the monitor:
    its judge, proposals, estimator settings and deployed decoding, on the same prompts with the
    same seeds. Gates: --max-p and --max-expected compare upper bounds, so a noisy estimate cannot
    pass by luck; --max-ratio fails when a one-sided test finds the candidate's risk above R times
    the baseline's (a one-sided test on the log ratio of the means, paired by prompt). With
    --baseline-from-history the baseline is the monitor's stored history instead (its current
    series pooled over the pooling horizon): unpaired, decided by the interval ends.

    With unreliable estimates a gate passes only on the conservative bound (unreliable prompts at
    their upper bounds), else it is inconclusive, which fails the check.

    Exit codes: 0 every gate passed, 1 a gate failed or was inconclusive, 2 usage or config error,
    3 runtime failure (which model or source failed is named).

    \b
    Example:
      tailmon check --config tailmon.yaml --candidate ./checkpoints/v2 \\
          --baseline ./checkpoints/v1 --max-p 1e-3 --max-ratio 1.5 \\
          --report-dir tailmon-report --junit tailmon-junit.xml
      tailmon check --config tailmon.yaml --candidate ./checkpoints/v2 \
          --baseline-from-history --max-ratio 1.5
    """
    from tailmon.check.gate import GateOptions, check_model_ref, model_settings, paraphraser_settings, run_check
    from tailmon.check.report import (
        check_table,
        prepare_dir,
        render_markdown,
        start_reports,
        write_check_reports,
        write_failure_reports,
    )
    from tailmon.monitor.config import load_config

    started = time.time()
    loaded = load_config(config_path)
    mon = _pick_monitor(loaded, monitor_name)
    if max_p is None and max_expected is None and max_ratio is None:
        raise InputError("give at least one gate: --max-p P, --max-expected N (with --window) or --max-ratio R")
    options = GateOptions(max_p=max_p, max_expected=max_expected, window=window, max_ratio=max_ratio)
    if from_history and baseline_ref is not None:
        raise InputError("--baseline and --baseline-from-history are two baselines: give one")
    if from_history and max_ratio is None:
        raise InputError("--baseline-from-history is the baseline of --max-ratio: add --max-ratio R")
    options.validate(mon, baseline_ref is not None or from_history)
    history = _history(config_path, mon) if from_history else None
    seed = _seed(mon, seed)
    popts = None
    if perturb:
        popts = _perturb_options(kinds_text, variants, seed, wrappers_file, paraphraser_ref, paraphrase_tokens)
    else:
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name, param in
                 (("perturbations", "kinds_text"), ("variants", "variants"), ("wrappers", "wrappers_file"),
                  ("paraphraser", "paraphraser_ref"), ("paraphrase_tokens", "paraphrase_tokens"))
                 if ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE]
        if given:
            raise InputError(f"{', '.join(given)} shape the variants of --perturb: add --perturb")
    if report_dir is not None:
        prepare_dir(report_dir)
    if junit_path is not None and os.path.dirname(junit_path):
        prepare_dir(os.path.dirname(junit_path))
    candidate = model_settings(mon, candidate_ref, candidate_system_prompt)
    baseline = model_settings(mon, baseline_ref) if baseline_ref is not None else None
    check_model_ref(candidate, "candidate")
    if baseline is not None:
        check_model_ref(baseline, "baseline")
    if paraphraser_ref is not None:
        check_model_ref(paraphraser_settings(mon, paraphraser_ref), "paraphraser")
    prompts, source = _prompts(loaded, mon, prompts_file, seed)
    if popts is not None:
        # The default paraphraser is the candidate itself (loaded by run_check).
        popts = _with_paraphraser(popts, paraphraser_ref, mon)
    total = len(prompts) * mon.estimator.samples * (2 if baseline is not None else 1)
    if not quiet:
        click.echo(f"checking {candidate_ref} against monitor {mon.name}: {len(prompts)} prompts x "
                   f"{mon.estimator.samples} samples" + (f", baseline {baseline_ref}" if baseline_ref else ""), err=True)
    start_reports(report_dir, junit_path, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)))
    try:
        with _bar(total, "check", quiet) as bar:
            result = run_check(mon, prompts, candidate=candidate, baseline=baseline, seed=seed, options=options,
                               config_path=str(loaded.path), prompt_source=source, perturb=popts,
                               progress=bar.update, add_total=_grow(bar), history=history)
    except Exception as exc:  # exit 2 or 3: the reports say why, not what an earlier check said
        write_failure_reports(report_dir, junit_path, f"tailmon check failed: {exc}")
        raise
    data = result.to_dict()
    written = write_check_reports(result, data, report_dir, junit_path, elapsed_s=time.time() - started)
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, allow_nan=False))
    elif fmt == "markdown":
        click.echo(render_markdown(data, [p for p in written if p.suffix == ".png"]), nl=False)
    else:
        click.echo(check_table(data))
    if written and not quiet:
        click.echo("reports: " + ", ".join(str(p) for p in written), err=True)
    if not result.passed:
        failed = [g.name for g in result.gates if g.verdict == "fail"]
        if failed:
            click.echo(f"gate failed: {', '.join(failed)}", err=True)
        for g in result.gates:
            if g.verdict == "inconclusive":
                click.echo(f"gate {g.name}: {g.detail}", err=True)
        sys.exit(EXIT_FAILED)


@command("sensitivity")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Daemon config (YAML) whose monitor defines prompts, judge, proposals and estimator. "
                   "Default: $TAILMON_CONFIG.")
@click.option("--monitor", "monitor_name", default=None, metavar="NAME",
              help="The monitor whose plan to use (default: the config's only one).")
@click.option("--model", "model_ref", default=None, metavar="MODEL",
              help="Model to probe (default: the monitor's).")
@click.option("--system-prompt", default=None, metavar="TEXT",
              help="Deployed system prompt (default: the monitor's).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Prompts to perturb, used whole (default: per_run prompts drawn from the monitor's source).")
@perturb_options
@click.option("--seed", type=int, default=None, help="Seed of the variants, prompt draw and sampling (default: the monitor's).")
@click.option("--report-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write sensitivity.md, sensitivity.json and sensitivity.png here.")
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True, help="What to print on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sensitivity(config_path, monitor_name, model_ref, system_prompt, prompts_file, kinds_text, variants,
                wrappers_file, paraphraser_ref, paraphrase_tokens, seed, report_dir, fmt, quiet):
    """Input sensitivity: estimate perturbed variants of every prompt (typos, casing, whitespace,
    role-play/jailbreak wrappers, model-written paraphrases) with a monitor's plan.

    Per prompt: each variant's harm probability, the spread (largest over smallest estimate) and
    the most dangerous variant. Deterministic for a given --seed. Exit 0 on success, 2 on a usage
    or config error, 3 on a runtime failure.

    \b
    Example:
      tailmon sensitivity --config tailmon.yaml --perturbations typo,wrapper,paraphrase \\
          --variants 3 --report-dir sensitivity-report
    """
    from tailmon.check.gate import check_model_ref, load_model, model_settings, paraphraser_settings
    from tailmon.check.report import (
        prepare_dir,
        render_sensitivity_report,
        sensitivity_table,
        write_sensitivity_reports,
    )
    from tailmon.check.sensitivity import run_sensitivity
    from tailmon.estimation.plan import plan_for_monitor
    from tailmon.monitor.config import load_config

    loaded = load_config(config_path)
    mon = _pick_monitor(loaded, monitor_name)
    seed = _seed(mon, seed)
    popts = _perturb_options(kinds_text, variants, seed, wrappers_file, paraphraser_ref, paraphrase_tokens)
    if report_dir is not None:
        prepare_dir(report_dir)
    mc = model_settings(mon, model_ref or mon.model.ref, system_prompt)
    check_model_ref(mc, "model")
    if paraphraser_ref is not None:
        check_model_ref(paraphraser_settings(mon, paraphraser_ref), "paraphraser")
    prompts, _ = _prompts(loaded, mon, prompts_file, seed)
    plan = plan_for_monitor(mon, seed, prompts, model=mc)
    engine = load_model(mc, "model", enable_lora=mon.engine_settings().enable_lora)
    click.get_current_context().call_on_close(engine.close)
    popts = _with_paraphraser(popts, paraphraser_ref, mon)
    with _bar(0, "sensitivity", quiet) as bar:
        sens = run_sensitivity(engine, plan, prompts, popts, progress=bar.update, add_total=_grow(bar))
    data = sens.to_dict()
    written = write_sensitivity_reports(data, report_dir) if report_dir is not None else []
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, allow_nan=False))
    elif fmt == "markdown":
        click.echo(render_sensitivity_report(data), nl=False)
    else:
        click.echo(sensitivity_table(data))
    if written and not quiet:
        click.echo("reports: " + ", ".join(str(p) for p in written), err=True)
