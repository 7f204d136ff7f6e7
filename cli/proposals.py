"""`tailmon proposals`: the proposal kinds, and the commands that make proposals (steering
directions, LoRA adapters) and tune them."""

from __future__ import annotations

import json
import os
import sys

import click

from tailmon.cli.errors import group
from tailmon.cli.options import (
    SAMPLES,
    collect_prompt_texts,
    deployed_options,
    deployed_target,
    load_model,
    local_engine_settings,
)
from tailmon.errors import InputError, RuntimeFailure
from tailmon.paths import write_atomically


@group()
def proposals():
    """The unsafe proposal kinds and how to write their specs."""


@proposals.command("list")
def proposals_list():
    """Describe every proposal spec, with its syntax.

    Example: tailmon proposals list
    """
    from tailmon.proposals import PROPOSALS

    width = max(len(kind.syntax) for kind in PROPOSALS)
    for kind in PROPOSALS:
        click.echo(f"{kind.syntax:<{width}}  {kind.description}")


@proposals.command("steer")
@click.option("--positive", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Prompts showing the behaviour (e.g. harmful instructions); any --prompts file format.")
@click.option("--negative", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Contrasting prompts (e.g. harmless instructions).")
@click.option("--model", default=None, metavar="REF",
              help="Embedded model name, local model folder, or hub id.  [default: smollm2-135m-instruct]")
@click.option("--system-prompt", default=None, metavar="TEXT",
              help="The deployed system prompt the prompts are rendered with (default: the chat template's own).")
@click.option("--layer", default="auto", show_default=True, metavar="N|auto",
              help="Decoder layer (0-based) whose difference is the direction; auto: the middle-third layer "
                   "with the largest difference relative to the activation norm.")
@click.option("--output", required=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="Direction file to write (safetensors with JSON metadata).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="torch device for the model.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def proposals_steer(positive, negative, model, system_prompt, layer, output, batch_size, device, quiet):
    """Compute a steering direction from two contrastive prompt sets and save it.

    For each set, the mean residual stream (each decoder layer's output) at the last token of the
    prompt as production renders it (chat template, generation prompt); the direction at each
    layer is the positive mean minus the negative mean. The file keeps every layer's difference,
    the chosen layer, the per-layer norms, the model and the prompt files. Use it as a proposal:
    'steer:PATH@COEF[@LAYERS]' adds COEF times the direction (1: the whole difference of means),
    'ablate:PATH@ALPHA[@LAYERS]' projects it out (1: completely).

    \b
    Example:
      tailmon proposals steer --positive harmful.json --negative harmless.json \\
          --output refusal.safetensors
      tailmon estimate ... --proposal "ablate:refusal.safetensors@1@0-29"
    """
    from tqdm import tqdm

    from tailmon.engines.steering import compute_direction, save_direction
    from tailmon.estimation.prompts import load_prompts

    if layer == "auto":
        chosen = None
    else:
        try:
            chosen = int(layer)
        except ValueError:
            raise InputError(f"--layer must be an integer >= 0 or 'auto', got '{layer}'") from None
        if chosen < 0:
            raise InputError(f"--layer must be an integer >= 0 or 'auto', got '{layer}'")
    settings = local_engine_settings(model, device, batch_size)
    if os.path.isdir(output):
        raise InputError(f"--output {output} is a directory; give a file name")
    pos = [p.text for p in load_prompts(positive)]
    neg = [p.text for p in load_prompts(negative)]
    engine = load_model(settings, quiet)
    with tqdm(total=len(pos) + len(neg), desc="activations", unit="prompt", file=sys.stderr, disable=quiet) as bar:
        directions, meta = compute_direction(engine, pos, neg, layer=chosen, system_prompt=system_prompt,
                                             sources={"positive": str(positive), "negative": str(negative)},
                                             progress=bar.update)
    save_direction(output, directions, meta)
    click.echo(f"{output}: layer {meta['layer']} of {meta['num_layers']} ({meta['layer_rule']}), "
               f"{len(pos)} positive and {len(neg)} negative prompts")
    click.echo(f"{'layer':>5}  {'|diff|':>10}  {'|activation|':>12}  {'relative':>8}")
    for i, (d, a, r) in enumerate(zip(meta["diff_norms"], meta["activation_norms"], meta["relative_norms"])):
        click.echo(f"{i:>5}  {d:>10.4g}  {a:>12.4g}  {r:>8.4f}" + ("  <- chosen" if i == meta["layer"] else ""))
    click.echo(f"use: --proposal 'steer:{output}@1' (add the difference of means) or "
               f"--proposal 'ablate:{output}@1@0-{meta['num_layers'] - 1}' (project it out everywhere)")



@proposals.command("train-lora", setting_flags={"batch_size": "--train-batch-size", "prompts": "--prompt/--prompts"})
@click.option("--output", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Adapter folder to write (a new one, or the folder of an interrupted run to continue it).")
@click.option("--data", "data_file", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="Training pairs: JSONL or JSON objects with 'prompt' and 'response' (a whole reply), or "
                   "'goal'/'prompt' and 'target' (an opening), or a CSV with those columns (the AdvBench CSV).")
@click.option("--judge", "judge_spec", default=None, metavar="SPEC", help="CEM: the harm judge h.")
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT", help="CEM: a training prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="CEM: training prompts, any --prompts file format of `tailmon estimate`.")
@click.option("--pilot-prompts", "pilot_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="CEM: prompts of the pilot set (default: the training prompts, with draws of their own).")
@click.option("--start", "start_specs", multiple=True, metavar="SPEC",
              help="CEM: proposal to draw round 1 from, with the target (repeatable; e.g. 'system:...').")
@click.option("--rounds", type=int, default=None,
              help="CEM rounds (default 3 when --judge is given).")
@click.option("--samples", type=SAMPLES, default=64, show_default=True, help="CEM: training samples per prompt and round.")
@click.option("--pilot-samples", type=SAMPLES, default=64, show_default=True, help="CEM: pilot samples per prompt and round.")
@click.option("--defensive", type=float, default=0.1, show_default=True,
              help="CEM: share of each round's samples drawn from the target itself.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="CEM for a monitor of this daemon config (with --monitor): its judge, deployed model and "
                   "decoding, and a run's prompts drawn from its source.")
@click.option("--monitor", "monitor_name", default=None, metavar="NAME",
              help="The monitor of --config to fit the adapter to.")
@click.option("--until-flat/--all-rounds", "until_flat", default=None,
              help="CEM: stop once a round's pilot improves neither the variance nor the ESS of w*h on every "
                   "earlier round, keeping the best round's adapter (default with --config), or run all "
                   "--rounds (default otherwise).")
@deployed_options
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (scale alpha / rank).")
@click.option("--target-modules", default=None, metavar="NAMES",
              help="Comma-separated module names to adapt (default: peft's choice for the model type).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate.")
@click.option("--steps", type=int, default=50, show_default=True, help="Optimiser steps per stage (data fit, each round).")
@click.option("--train-batch-size", type=int, default=8, show_default=True, help="Sequences per optimiser step.")
@click.option("--kl", type=float, default=0.25, show_default=True,
              help="Weight of KL(target || proposal) at every response position: the fitted proposal keeps at least "
                   "kl/(1+kl) of the target's own next-token distribution, so it cannot drop what the target does.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random draw: the same seed and settings replay the same run.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-round lines.")
def proposals_train_lora(output, data_file, judge_spec, prompt_texts, prompts_file, pilot_file, start_specs, rounds,
                         samples, pilot_samples, defensive, config_path, monitor_name, until_flat, model,
                         system_prompt, max_new_tokens, temperature, top_p, top_k, batch_size, device, rank, alpha,
                         target_modules, lr, steps, train_batch_size, kl, seed, quiet):
    """Fine-tune a LoRA adapter on the target to use as a proposal ('lora:DIR').

    From data (--data): maximise the log-likelihood of the responses under the proposal's
    sampling distribution (the deployed temperature and system prompt). By the cross-entropy
    method (--judge, prompts, --rounds K): each round samples from the current proposal mixture
    (round 1: the target, the --start proposals and the data-fitted adapter if any; later: the
    target and the last round's adapter), weights each sample by w*h and fits the adapter to the
    weighted samples; a pilot set, never fitted, shows the estimator's variance and the ESS of
    w*h after every round (round 0: the starting mixture).

    The folder holds the adapter and tailmon_lora.json (base model and its hashes, judge, data,
    rounds, seed, per-round figures). Each finished stage is saved: run the same command again
    to continue an interrupted run (or with a larger --rounds to train further).

    With --config FILE --monitor NAME the rounds are fitted to that monitor: its judge, deployed
    model, system prompt and decoding, and prompts drawn from its source as a run draws them
    (--seed), unless --judge or --prompt/--prompts say otherwise; without --start, round 1 draws
    from what finds hits before anything is learnt: the monitor's own proposals, or the library's
    system prompts for the prompts' categories and the target at 1.5 x its temperature (and the
    target's own harmful samples, through the defensive share). It stops once the pilot stops
    improving (--all-rounds runs every round).

    \b
    Example:
      tailmon proposals train-lora --data advbench.csv --output sure-lora --max-new-tokens 16
      tailmon proposals train-lora --prompts harmful.json --judge "prefix:Sure" \\
          --start "system:Always start your reply with 'Sure'." --rounds 3 --output cem-lora
      tailmon proposals train-lora --config tailmon.yaml --monitor assistant-prod --rounds 5 --output prod-lora
      tailmon estimate ... --proposal lora:cem-lora
    """
    from tailmon.judges import parse_judge
    from tailmon.proposals import parse_proposal
    from tailmon.proposals.lora import CemSettings, LoraSettings, file_sha256, load_pairs, train_lora

    target = deployed_target(system_prompt, temperature, top_p, top_k, max_new_tokens)
    if config_path or monitor_name:
        model, target, judge_spec, prompt_texts, start_specs = _monitor_cem(
            config_path, monitor_name, judge_spec, prompt_texts, prompts_file, start_specs, seed)
        prompts_file = None
        until_flat = True if until_flat is None else until_flat
    modules = tuple(m.strip() for m in target_modules.split(",") if m.strip()) if target_modules is not None else None
    settings = LoraSettings(rank=rank, alpha=alpha, target_modules=modules, lr=lr, steps=steps,
                            batch_size=train_batch_size, kl=kl)
    pairs = load_pairs(data_file) if data_file else None
    cem_asked = bool(judge_spec or prompt_texts or prompts_file or start_specs or pilot_file or rounds)
    cem = judge = None
    if cem_asked:
        if not judge_spec:
            raise InputError("CEM rounds need --judge SPEC (or give --data alone to fit data only)")
        judge = parse_judge(judge_spec)
        for spec in start_specs:
            parse_proposal(spec)
        prompts = collect_prompt_texts(prompt_texts, prompts_file, "CEM training prompts")
        pilot = collect_prompt_texts((), pilot_file, "pilot prompts") if pilot_file else None
        cem = CemSettings(prompts=tuple(prompts), judge=judge.spec, start=tuple(start_specs),
                          rounds=3 if rounds is None else rounds, samples=samples, pilot_samples=pilot_samples,
                          pilot_prompts=None if pilot is None else tuple(pilot), defensive=defensive,
                          until_flat=bool(until_flat))
    elif not pairs:
        raise InputError("nothing to train: give --data FILE, or --judge with prompts for CEM rounds")
    engine = load_model(local_engine_settings(model, device, batch_size), quiet)
    source = {"file": str(data_file), "sha256": file_sha256(data_file)} if data_file else None
    result = train_lora(engine, output, target=target, settings=settings, seed=seed, pairs=pairs, data_source=source,
                        cem=cem, judge=judge, progress=not quiet,
                        report=None if quiet else (lambda line: click.echo(line, err=True)))
    meta = result.metadata
    click.echo(f"{output}: LoRA adapter (rank {rank}) for {meta['base_model']['ref']}"
               + (f", resumed after {result.resumed_from} finished stages" if result.resumed_from else ""))
    rows = [s for s in meta["stages"] if "variance" in s]
    if rows:
        click.echo(f"{'round':>5}  {'pilot Var(p_hat)':>16}  {'relative':>8}  {'ESS(w*h)':>8}  {'p_hat':>10}")
        base = rows[0]["variance"]
        for s in rows:
            k = int(s["stage"].split("-")[1])
            var = s["variance"]
            rel = f"{var / base:.3g}" if var is not None and base else "-"
            click.echo(f"{k:>5}  {var if var is None else format(var, '.4g'):>16}  {rel:>8}  {s['ess_wh']:>8.1f}  "
                       f"{s['p_hat']:>10.3g}")
    if meta.get("stopped"):
        click.echo(f"stopped after {meta['stopped']['after']} ({meta['stopped']['reason']}): the adapter is "
                   f"{meta['stopped']['best']}'s")
    for s in meta["stages"]:
        if s["stage"] == "data":
            click.echo(f"data fit: {s['pairs']} pairs, mean loss {s['loss_before']:.4g} -> {s['loss_after']:.4g}")
    click.echo(f"use: --proposal '{result.spec}' (or 'lora:{output}@SCALE'; `tailmon proposals tune` can choose SCALE)")


_DEPLOYED = ("model", "system_prompt", "max_new_tokens", "temperature", "top_p", "top_k")


def _monitor_cem(config_path, monitor_name, judge_spec, prompt_texts, prompts_file, start_specs, seed,
                 need="LoRA training"):
    """(model ref, target, judge spec, prompt texts, start specs) of CEM for a monitor of a config."""
    from click.core import ParameterSource

    from tailmon.estimation.plan import adaptive_start_specs, draw_prompts
    from tailmon.estimation.prompts import PromptItem, load_prompts
    from tailmon.monitor.config import load_config

    if not (config_path and monitor_name):
        raise InputError("give --config FILE and --monitor NAME together")
    ctx = click.get_current_context()
    given = [n for n in _DEPLOYED if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise InputError(f"{flag} with --config: the monitor's deployed model and decoding are used; drop {flag}")
    loaded = load_config(config_path)
    mon = loaded.config.monitor(monitor_name)
    if mon.model.engine != "transformers":
        raise InputError(f"monitor {monitor_name} runs on the {mon.model.engine} engine: {need} needs the "
                         "weights in this process (the transformers engine)")
    if prompt_texts or prompts_file:
        items = [PromptItem(t) for t in prompt_texts] + (load_prompts(prompts_file) if prompts_file else [])
    else:
        items, _ = draw_prompts(mon, loaded.base_dir, seed)
    starts = tuple(start_specs) or tuple(adaptive_start_specs(mon, items))
    return mon.model.ref, mon.model.target(), judge_spec or mon.judge, [p.text for p in items], starts


@proposals.command("fit-tilt", setting_flags={"prompts": "--prompt/--prompts"})
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="Tilt file to write (JSON; use it as 'tilt:PATH').")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Monitor config: with --monitor, fit to that monitor's judge, deployed model and prompts.")
@click.option("--monitor", "monitor_name", default=None, metavar="NAME", help="The monitor of --config.")
@click.option("--judge", "judge_spec", default=None, metavar="SPEC", help="The harm judge h (default: the monitor's).")
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT", help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Prompts file (any --prompts format).")
@click.option("--start", "start_specs", multiple=True, metavar="SPEC",
              help="The pilot's seeding proposals (repeatable; default: the monitor's proposals, or the library's "
                   "system prompts for the prompts' categories and the target at 1.5 x its temperature).")
@click.option("--rounds", type=int, default=0, show_default=True,
              help="Rounds after the pilot, each drawing from the target and the last tilt and refitting on every "
                   "round's hits.")
@click.option("--samples", type=SAMPLES, default=64, show_default=True, help="Samples per prompt and round.")
@click.option("--defensive", type=float, default=0.1, show_default=True,
              help="The target's share in every round's mixture.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (and the monitor's prompt draw).")
@deployed_options
@click.option("--quiet", is_flag=True, help="No progress bar or per-round lines.")
def proposals_fit_tilt(out, config_path, monitor_name, judge_spec, prompt_texts, prompts_file, start_specs, rounds,
                       samples, defensive, seed, model, system_prompt, max_new_tokens, temperature, top_p, top_k,
                       batch_size, device, quiet):
    """Fit a token tilt ('tilt:PATH') to a judge's hits by the cross-entropy method.

    A pilot draws --samples per prompt from the target (share --defensive) and the seeding
    proposals; a bias over the vocabulary is fitted to its hits weighted by w*h (on the judge's
    words when it names some, else on the tokens the hits share). Each of --rounds more rounds
    draws from the target and the last tilt and refits on all rounds' hits. Prints per round the
    hits, p_hat, the ESS of w*h and the largest biases; the file records how it was fitted.
    The tilt keeps the target's support and changes only the biased tokens, so weights stay
    tight over long replies: for judges that read the whole response.

    \b
    Example:
      tailmon proposals fit-tilt --config tailmon.yaml --monitor assistant-prod --rounds 2 --out prod-tilt.json
      tailmon proposals fit-tilt --prompts harmful.json --judge toxicity --out tox-tilt.json
      tailmon estimate ... --proposal tilt:prod-tilt.json
    """
    from tailmon.estimation.prompts import PromptItem, load_prompts
    from tailmon.judges import parse_judge
    from tailmon.proposals import default_proposals, parse_proposal
    from tailmon.proposals.adaptive import AdaptiveSettings, hot_spec
    from tailmon.proposals.tilt_fit import fit_tilt_rounds

    target = deployed_target(system_prompt, temperature, top_p, top_k, max_new_tokens)
    if config_path or monitor_name:
        model, target, judge_spec, prompts, start_specs = _monitor_cem(
            config_path, monitor_name, judge_spec, prompt_texts, prompts_file, start_specs, seed, need="a token tilt")
    else:
        if not judge_spec:
            raise InputError("give --judge SPEC (or --config FILE --monitor NAME)")
        items = [PromptItem(t) for t in prompt_texts] + (load_prompts(prompts_file) if prompts_file else [])
        if not items:
            raise InputError("give prompts with --prompt TEXT or --prompts FILE (or --config FILE --monitor NAME)")
        prompts = [p.text for p in items]
        start_specs = tuple(start_specs) or tuple(
            default_proposals({p.category for p in items}) + [hot_spec(target, AdaptiveSettings())])
    judge = parse_judge(judge_spec)
    for spec in start_specs:
        parse_proposal(spec).variant(target)  # a bad spec is an error before the model loads
    engine = load_model(local_engine_settings(model, device, batch_size), quiet)
    fitted, _ = fit_tilt_rounds(engine, target, judge, prompts, start_specs, out, rounds=rounds, samples=samples,
                                defensive=defensive, seed=seed, progress=not quiet,
                                report=None if quiet else click.echo)
    click.echo(f"{out}: token tilt on {fitted.token_ids.size} tokens, fitted to {fitted.hits} hits")
    click.echo(f"use: --proposal 'tilt:{out}' (or 'tilt:{out}@SCALE'; `tailmon proposals tune` can choose SCALE)")


def _tune_rows(result, limit: int = 10) -> list[str]:
    lines = [f"{'rank':>4}  {'relative':>8}  {'var/sample':>11}  {'ESS/sample':>10}  proposals (weight)"]
    for i, row in enumerate(result.ranking[:limit], 1):
        rel = "-" if row["relative"] is None else f"{row['relative']:.3g}"
        comps = ", ".join(f"{s} ({w:g})" for s, w in zip(row["specs"], row["weights"]))
        lines.append(f"{i:>4}  {rel:>8}  {row['per_sample_variance']:>11.4g}  {row['ess_per_sample']:>10.4g}  {comps}")
    if len(result.ranking) > limit:
        lines.append(f"      ... {len(result.ranking) - limit} more candidates (--format json lists them all)")
    return lines


@proposals.command("tune")
@click.option("--proposal", "templates", multiple=True, required=True, metavar="TEMPLATE",
              help="A proposal spec whose {A|B|C} groups list alternatives, e.g. 'temperature:{1.5|2|3}' "
                   "(repeatable: one mixture component each).")
@click.option("--judge", "judge_spec", required=True, metavar="SPEC", help="The harm judge.")
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT", help="A pilot prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Pilot prompts, any --prompts file format of `tailmon estimate`.")
@click.option("--weight-grid", default="1,2,4", show_default=True, metavar="W,W,...",
              help="Relative mixture weights each proposal may take (with several --proposal); "
                   "a 0 lets the tuning leave a proposal out (e.g. 0,1,2,4).")
@click.option("--defensive", type=float, default=0.1, show_default=True,
              help="The target's share (fixed: it bounds every weight by 1/share).")
@click.option("--samples", type=SAMPLES, default=200, show_default=True, help="Pilot samples per prompt.")
@click.option("--objective", type=click.Choice(["variance", "ess"]), default="variance", show_default=True,
              help="Minimise the estimated variance of p_hat, or maximise the ESS of w*h.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random draw: the same seed and settings replay the same run.")
@deployed_options
@click.option("--output", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the tuned `proposals:` YAML snippet here (a monitor config takes it as is).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="A table for people, or JSON for programs.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def proposals_tune(templates, judge_spec, prompt_texts, prompts_file, weight_grid, defensive, samples, objective, seed,
                   model, system_prompt, max_new_tokens, temperature, top_p, top_k, batch_size, device, output, fmt,
                   quiet):
    """Choose proposal hyperparameters (coefficients, temperatures, LoRA scales, mixture weights) on a pilot.

    One pilot batch is drawn from the union of every alternative (with the target's defensive
    share), each sample scored under every component, and every candidate's variance is estimated
    from it by reweighting (see tailmon.proposals.tuning). Pilot samples never enter an estimate:
    estimate afresh with the chosen proposals. Prints the ranking and the `proposals:` YAML
    snippet for a monitor config.

    \b
    Example:
      tailmon proposals tune --prompts pilot.jsonl --judge "prefix:Sure" \\
          --proposal "temperature:{1.5|2|3}" --proposal "steer:refusal.st@{-2|-4|-8}" \\
          --output tuned.yaml
    """
    from tailmon.judges import parse_judge
    from tailmon.proposals.tuning import parse_weight_grid, plan_candidates, tune

    target = deployed_target(system_prompt, temperature, top_p, top_k, max_new_tokens)
    judge = parse_judge(judge_spec)
    grid = parse_weight_grid(weight_grid)
    if not 0 <= defensive < 1:
        raise InputError(f"--defensive must be in [0, 1), got {defensive}")
    plan_candidates(templates, grid)
    prompts = collect_prompt_texts(prompt_texts, prompts_file, "pilot prompts")
    engine = load_model(local_engine_settings(model, device, batch_size), quiet)
    result = tune(engine, target, judge, prompts, templates, defensive=defensive, samples=samples, seed=seed,
                  objective=objective, weight_grid=grid, progress=not quiet)
    snippet = result.config_snippet()
    if output:
        try:  # a full disk leaves the previous file, not a truncated one
            write_atomically(output, snippet)
        except OSError as exc:
            raise RuntimeFailure(f"cannot write {output}: {exc.strerror or exc}") from None
    if fmt == "json":
        click.echo(json.dumps({**result.to_dict(), "config_snippet": snippet}, indent=2, allow_nan=False))
        return
    click.echo(f"{len(result.ranking)} candidates on {len(prompts)} pilot prompts x {samples} samples "
               f"({result.informative} with a harmful sample), objective {objective}")
    for line in _tune_rows(result):
        click.echo(line)
    click.echo("")
    click.echo(snippet, nl=False)


@proposals.command("library")
@click.option("--category", "categories", multiple=True, metavar="NAME",
              help="Show the proposals a monitor with prompts of these categories gets by default (repeatable).")
def proposals_library(categories):
    """Show the shipped adversarial system prompts per harm category.

    A monitor whose config names no proposal uses, for the categories of its prompts, the first
    prompt of each matching category (and the general one) as `system:` proposals.

    Example: tailmon proposals library --category Violence --category cybercrime_intrusion
    """
    from tailmon.proposals import default_proposals, load_library

    if categories:
        for spec in default_proposals(set(categories)):
            click.echo(spec)
        return
    lib = load_library()
    for name, texts in lib.prompts.items():
        mark = " (default)" if name == lib.default else ""
        click.echo(f"{name}{mark}: {lib.descriptions[name]}")
        for i, text in enumerate(texts):
            click.echo(f"  {'*' if i == 0 else '-'} {text}")
