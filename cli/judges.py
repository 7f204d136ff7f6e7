"""`tailmon judges`: the harm judges and their specs."""

from __future__ import annotations

import click

from tailmon.cli.errors import group


@group()
def judges():
    """The harm judges and how to write their specs."""


@judges.command("list")
def judges_list():
    """Describe every judge spec, with its syntax.

    Any spec can end in >=T to threshold it; compositions nest.

    Example: tailmon judges list
    """
    from tailmon.judges import describe_judges

    rows = describe_judges()
    width = max(len(syntax) for _, syntax, _ in rows)
    for _, syntax, description in rows:
        click.echo(f"{syntax:<{width}}  {description}")
