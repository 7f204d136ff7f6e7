"""Options and helpers that several commands share: the deployed model and decoding, prompts
from the command line, the config file, the store it names."""

from __future__ import annotations

import os

import click

from tailmon.errors import InputError

# Samples per prompt at most: tailmon.estimation.pipeline.MAX_SAMPLES (README "Limits"), written
# out here so that `tailmon --help` need not import the estimation (tests/cli/test_cli_limits.py
# checks that the two agree). The proposal-fitting commands' sample options take this type;
# `estimate` checks its counts against the pipeline's own cap (a one-line error naming the flag).
MAX_SAMPLES = 100_000
SAMPLES = click.IntRange(max=MAX_SAMPLES)

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
    help="Daemon config (YAML). Default: $TAILMON_CONFIG.")


def deployed_options(f):
    """The deployed model and decoding, as `tailmon estimate` takes them (for commands that build
    proposals: a proposal is fitted to the distribution production samples from)."""
    options = [
        click.option("--model", default=None, metavar="REF",
                     help="Embedded model name, local model folder, or hub id.  [default: smollm2-135m-instruct]"),
        click.option("--system-prompt", default=None, metavar="TEXT",
                     help="The deployed system prompt (default: whatever the chat template adds)."),
        click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Deployed response length cap."),
        click.option("--temperature", type=float, default=1.0, show_default=True, help="Deployed temperature."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Deployed nucleus mass (1 = off)."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Deployed top-k (0 = off)."),
        click.option("--batch-size", type=int, default=64, show_default=True, help="Sequences per forward pass."),
        click.option("--device", default="cpu", show_default=True, help="torch device for the model."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def deployed_target(system_prompt, temperature, top_p, top_k, max_new_tokens):
    """The target variant the `deployed_options` describe."""
    from tailmon.engines.base import Decoding, Variant

    decoding = Decoding(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)
    return Variant("target", decoding, system_prompt=system_prompt)


def load_model(settings, quiet: bool):
    """The engine `settings` (an EngineSettings) names, through the one loader, closed when the
    command ends."""
    from tailmon.engines.loading import load_engine

    if not quiet:
        click.echo(f"loading {settings.ref or 'smollm2-135m-instruct'} ({settings.engine}) ...", err=True)
    engine = load_engine(settings)
    click.get_current_context().call_on_close(engine.close)
    return engine


def local_engine_settings(model, device, batch_size):
    """The transformers engine in this process (training and tuning need its gradients and hooks)."""
    from tailmon.engines.loading import EngineSettings

    return EngineSettings(engine="transformers", ref=model, device=device, batch_size=batch_size)


def collect_prompt_texts(prompt_texts, prompts_file, what):
    from tailmon.estimation.prompts import load_prompts

    texts = list(prompt_texts) + ([p.text for p in load_prompts(prompts_file)] if prompts_file else [])
    if not texts:
        raise InputError(f"give {what} with --prompt TEXT or --prompts FILE")
    return texts


def read_prompt_items(prompt_texts, prompts_file):
    from tailmon.estimation.prompts import PromptItem, load_prompts

    items = [PromptItem(t) for t in prompt_texts]
    if prompts_file:
        items += load_prompts(prompts_file)
    if not items:
        raise InputError("give at least one --prompt TEXT or --prompts FILE")
    return items


def open_store(config_path):
    """The store the config (or the environment) names, opened for reading: the CLI's readers
    neither migrate nor write, so they work on a read-only file and never wait for the daemon."""
    from tailmon.store import Store, resolve_database_url

    configured = None
    if config_path or os.environ.get("TAILMON_CONFIG"):
        from tailmon.monitor.config import load_config

        configured = load_config(config_path).config.database
    return Store(resolve_database_url(configured)).open(read_only=True)
