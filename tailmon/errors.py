"""Errors shared by every package; the CLI maps them to exit codes (DESIGN section 8).

Libraries raise these plain exceptions and never import click: `InputError` and its subclasses
are the user's mistakes (exit 2, one line), `RuntimeFailure` is a component that failed at run
time (exit 3, naming which).
"""


class TailmonError(Exception):
    """Base of every error tailmon raises on purpose."""


class InputError(TailmonError, ValueError):
    """Bad usage, input or configuration: exit code 2, reported as one line."""


class SpecError(InputError):
    """A malformed judge or proposal spec string."""


class RuntimeFailure(TailmonError, RuntimeError):
    """A model, database or endpoint failed while running: exit code 3."""
