"""`tailmon config`: validate the daemon's configuration, print an example."""

from __future__ import annotations

import click

from tailmon.cli.errors import group


@group()
def config():
    """Check and write the daemon's configuration."""


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False), required=False)
def config_validate(file):
    """Validate a config file: schema, environment variables, judge and proposal specs.

    Prints a summary and exits 0, or prints one line naming the file, the key and what is wrong
    and exits 2.

    Example: tailmon config validate /etc/tailmon/tailmon.yaml
    """
    from tailmon.monitor.config import load_config

    loaded = load_config(file)
    cfg = loaded.config
    click.echo(f"{loaded.path}: valid, {len(cfg.monitors)} monitor(s)")
    for m in cfg.monitors:
        when = f"every {m.schedule.every}" if m.schedule.every else f"cron '{m.schedule.cron}'"
        click.echo(f"  {m.name}: {m.model.ref}, {m.prompts.per_run} prompts x {m.estimator.samples} samples, "
                   f"judge {m.judge}, {when}")


@config.command("example")
def config_example():
    """Print an annotated example config to start from.

    Example: tailmon config example > tailmon.yaml
    """
    from tailmon.monitor.config import EXAMPLE

    click.echo(EXAMPLE, nl=False)
