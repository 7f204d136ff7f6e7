"""Errors shared by every package; the CLI maps them to exit codes (DESIGN section 8).

Libraries raise these plain exceptions and never import click: `InputError` and its subclasses
are the user's mistakes (exit 2, one line), `RuntimeFailure` is a component that failed at run
time (exit 3, naming which), `InternalError` is tailmon contradicting itself (a bug: exit 3, not
blamed on the user's input). Library messages speak the library's words, never a CLI flag; an
InputError about one setting names it (`setting="rank"`), and the CLI puts the flag in its place.
"""


class TailmonError(Exception):
    """Base of every error tailmon raises on purpose."""


class InputError(TailmonError, ValueError):
    """Bad usage, input or configuration: exit code 2, reported as one line.

    `setting`: the name of the setting the message is about (a keyword of the library call, e.g.
    "rank"), which a front end replaces with its own name for it (the CLI's "--rank")."""

    def __init__(self, message: str = "", *, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class SpecError(InputError):
    """A malformed judge or proposal spec string."""


class RuntimeFailure(TailmonError, RuntimeError):
    """A model, database or endpoint failed while running: exit code 3."""


class InternalError(TailmonError, RuntimeError):
    """tailmon contradicts itself (an invariant of its own code does not hold): a bug, exit code 3."""
