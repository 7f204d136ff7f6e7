"""The one place that maps tailmon's errors to exit codes and names the flags (DESIGN section 8).

Exit codes: 0 success (a gate passed); 1 a gate failed or an alert fires after the run; 2 usage,
input or config error (one line, no traceback); 3 runtime failure (a model, database or endpoint
failed, or tailmon itself is inconsistent: a bug); 130 interrupted (Ctrl-C); 141 the reader of
stdout went away (`| head`), as for other Unix tools.

Library errors speak the library's words ("rank must be an integer >= 1") and may name the
setting they are about (`InputError(..., setting="rank")`). A command run from here knows its
options, so it names the flag the user typed: "--rank must be an integer >= 1".
"""

from __future__ import annotations

import os
import re
import sys

import click

from tailmon.errors import InputError, InternalError, RuntimeFailure
from tailmon.redact import mask_secrets

EXIT_FAILED = 1
"""A gate failed (or was inconclusive), or an alert rule fires after the run."""
EXIT_INPUT = 2
EXIT_RUNTIME = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: the reader of stdout closed it early (`| head`), as other Unix tools exit."""


def flag_for(ctx: click.Context, setting: str) -> str | None:
    """The option of the command in `ctx` that sets `setting`: its parameter name, an explicit
    `setting_flags` mapping of the command, or an option spelt like the setting."""
    command = ctx.command
    explicit = getattr(command, "setting_flags", {}).get(setting)
    if explicit:
        return explicit
    spelt = "--" + setting.replace("_", "-")
    for param in command.params:
        if isinstance(param, click.Option) and (param.name == setting or spelt in param.opts):
            return max(param.opts, key=len)
    return None


def with_flag(message: str, setting: str | None, flag: str | None) -> str:
    """'rank must be ...' -> '--rank must be ...'; a message about the setting that does not open
    with its name gets the flag in front: '--judge: CEM needs a judge'."""
    if not setting or not flag:
        return message
    opening = re.match(rf"{re.escape(setting.replace('_', ' '))}\b|{re.escape(setting)}\b", message)
    if opening:
        return flag + message[opening.end():]
    return f"{flag}: {message}"


class Command(click.Command):
    """A command whose input errors name its flags."""

    setting_flags: dict[str, str] = {}

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            setting = getattr(exc, "setting", None)
            if setting:
                exc.args = (with_flag(str(exc), setting, flag_for(ctx, setting)),)
            raise


def command(name: str | None = None, *, setting_flags: dict[str, str] | None = None, **kwargs):
    """`click.command` for tailmon commands; `setting_flags` maps library setting names to flags
    where they differ (e.g. {'batch_size': '--train-batch-size'})."""
    def decorate(f):
        cmd = click.command(name, cls=Command, **kwargs)(f)
        cmd.setting_flags = dict(setting_flags or {})
        return cmd
    return decorate


class Group(click.Group):
    """A command group whose commands and subgroups are tailmon's own."""

    command_class = Command
    group_class = type  # subgroups are of this class too

    def command(self, *args, setting_flags: dict[str, str] | None = None, **kwargs):
        decorator = super().command(*args, **kwargs)
        if not setting_flags:
            return decorator

        def decorate(f):
            cmd = decorator(f)
            cmd.setting_flags = dict(setting_flags)
            return cmd
        return decorate


def group(name: str | None = None, cls: type[click.Group] = Group, **kwargs):
    """`click.group` for tailmon's command groups."""
    return click.group(name, cls=cls, **kwargs)


class RootGroup(Group):
    """The `tailmon` group: turns tailmon's errors into one line on stderr and the documented exit code.
    Credentials quoted by an error (a URL's password, a token in its query) are masked."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.echo(f"error: {mask_secrets(str(exc))}", err=True)
            ctx.exit(EXIT_INPUT)
        except InternalError as exc:
            click.echo(f"internal error (a bug in tailmon, please report it): {mask_secrets(str(exc))}", err=True)
            ctx.exit(EXIT_RUNTIME)
        except RuntimeFailure as exc:
            click.echo(f"runtime failure: {mask_secrets(str(exc))}", err=True)
            ctx.exit(EXIT_RUNTIME)
        except KeyboardInterrupt:  # Ctrl-C (and SIGTERM where a command maps it to the same)
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`tailmon runs list | head`): nothing is wrong with tailmon.
            # Exit as a process killed by SIGPIPE does, like other Unix tools, without a message;
            # stdout points at /dev/null so that the interpreter's final flush cannot fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(EXIT_BROKEN_PIPE)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a failure nobody anticipated: still exit 3, traceback on request
            if os.environ.get("TAILMON_DEBUG") == "1":
                raise
            click.echo(f"runtime failure: {type(exc).__name__}: {mask_secrets(str(exc))} (TAILMON_DEBUG=1 shows the "
                       "traceback)", err=True)
            ctx.exit(EXIT_RUNTIME)
