"""The CLI's structure: every command explains itself, errors map to exit codes in one place, and
library messages get the running command's flag names.

The exit-code and flag tests run real click commands of the classes `tailmon` uses
(`tailmon.cli.errors`), so they check the mapping itself rather than one command's use of it.
"""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from tailmon.cli.errors import EXIT_INPUT, EXIT_RUNTIME, RootGroup, command, group, with_flag
from tailmon.cli.main import main
from tailmon.errors import InputError, InternalError, RuntimeFailure


def walk(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from walk(sub, path + (name,))


COMMANDS = list(walk(main))


def test_the_tree_is_the_documented_one():
    # A command group lost in the split (a module not registered on the root) fails here.
    top = {path[0] for path, _ in COMMANDS if len(path) == 1}
    assert top == {"models", "judges", "proposals", "estimate", "config", "run", "runs", "alerts", "check",
                   "sensitivity"}
    assert len(COMMANDS) >= 25


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "tailmon")
def test_every_command_and_group_has_help_text(path):
    cmd = dict(COMMANDS)[path]
    assert (cmd.help or "").strip(), f"tailmon {' '.join(path)} has no help text"
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")
    # the first paragraph of the docstring is what `--help` shows first
    assert cmd.help.strip().split("\n")[0][:40] in " ".join(result.output.split())
    for param in cmd.params:  # every option says what it is for (click's own --help aside)
        if isinstance(param, click.Option) and param.name != "help" and not param.hidden:
            assert param.help, f"tailmon {' '.join(path)}: {param.opts[0]} has no help"


def build(raising: Exception, **setting_flags):
    @group(cls=RootGroup)
    def root():
        """Root."""

    @root.command("go", setting_flags=setting_flags)
    @click.option("--rank", type=int, default=1, help="Rank.")
    @click.option("--train-batch-size", type=int, default=1, help="Batch.")
    @click.option("--prompts", "prompts_file", default=None, help="Prompts.")
    def go(rank, train_batch_size, prompts_file):
        """Go."""
        raise raising

    @command("solo")
    @click.option("--rank", type=int, default=1, help="Rank.")
    def solo(rank):
        """Solo."""
        raise raising

    root.add_command(solo)
    return root


@pytest.mark.parametrize("error, args, code, line", [
    (InputError("rank must be an integer >= 1, got 0", setting="rank"), ["go"], EXIT_INPUT,
     "error: --rank must be an integer >= 1, got 0"),
    (InputError("rank must be an integer >= 1, got 0", setting="rank"), ["solo"], EXIT_INPUT,
     "error: --rank must be an integer >= 1, got 0"),
    (InputError("batch size must be an integer >= 1, got 0", setting="batch_size"), ["go"], EXIT_INPUT,
     "error: --train-batch-size must be an integer >= 1, got 0"),
    (InputError("CEM needs prompts", setting="prompts"), ["go"], EXIT_INPUT, "error: --prompts: CEM needs prompts"),
    (InputError("no such setting here", setting="volume"), ["go"], EXIT_INPUT, "error: no such setting here"),
    (InputError("plain"), ["go"], EXIT_INPUT, "error: plain"),
    (RuntimeFailure("database down"), ["go"], EXIT_RUNTIME, "runtime failure: database down"),
    (InternalError("weights disagree"), ["go"], EXIT_RUNTIME,
     "internal error (a bug in tailmon, please report it): weights disagree"),
    (ZeroDivisionError("x"), ["go"], EXIT_RUNTIME,
     "runtime failure: ZeroDivisionError: x (TAILMON_DEBUG=1 shows the traceback)"),
])
def test_errors_map_to_exit_codes_and_name_the_flag(error, args, code, line, monkeypatch):
    monkeypatch.delenv("TAILMON_DEBUG", raising=False)
    root = build(error, batch_size="--train-batch-size")
    result = CliRunner().invoke(root, args)
    assert result.exit_code == code, result.output
    assert result.stderr.strip().splitlines() == [line]


def test_an_internal_error_is_not_blamed_on_the_user():
    # InternalError must not be an InputError (exit 2 would tell the user their input is wrong)
    assert not issubclass(InternalError, InputError)


@pytest.mark.parametrize("message, setting, flag, expected", [
    ("rank must be >= 1", "rank", "--rank", "--rank must be >= 1"),
    ("pilot share must be in (0, 1)", "pilot_share", "--pilot-share", "--pilot-share must be in (0, 1)"),
    ("max_p must be a probability", "max_p", "--max-p", "--max-p must be a probability"),
    ("ranking is off", "rank", "--rank", "--rank: ranking is off"),  # a word that only starts alike
    ("CEM needs a judge", "judge", "--judge", "--judge: CEM needs a judge"),
    ("CEM needs a judge", "judge", None, "CEM needs a judge"),
])
def test_with_flag(message, setting, flag, expected):
    assert with_flag(message, setting, flag) == expected


def test_a_reader_that_goes_away_is_not_a_failure(tmp_path):
    """`tailmon runs list | head -1`: before, exit 3 and a BrokenPipeError line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tailmon.store import Store

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = Store(url).open()
    try:  # far more output (about 1,500 lines of 100 bytes) than a pipe holds (64 KiB), so the
        # writer meets the closed pipe
        for i in range(1500):
            store.start_run("m", model_ref="x", model_version=1, config_hash="c", settings={})
    finally:
        store.close()
    tailmon = str(Path(sys.executable).with_name("tailmon"))
    proc = subprocess.Popen([tailmon, "runs", "list", "--limit", "1500"],
                            env={**os.environ, "TAILMON_DATABASE_URL": url}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().split()[:2] == [b"id", b"monitor"]
    proc.stdout.close()  # the reader goes away, as `head -1` does
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""


@pytest.mark.parametrize("kind", ["judge", "prompts"])
def test_input_nested_thousands_deep_is_an_input_error(kind, tmp_path):
    # Before: RecursionError, exit 3 as if tailmon had failed.
    args = ["estimate", "--judge", "prefix:Sure", "--prompt", "hi", "--proposal", "temperature:2"]
    if kind == "judge":
        args[2] = "any(" * 5000 + "prefix:a" + ")" * 5000
    else:
        nested = tmp_path / "p.json"
        nested.write_text("[" * 100000 + "]" * 100000)
        args[3:5] = ["--prompts", str(nested)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == EXIT_INPUT, result.output
    assert "nested too deeply" in result.stderr and "Traceback" not in result.output
