"""One plug-in mechanism for judges, proposals and engines: a registry of named entries.

Each kind of plug-in has one `Registry` (`tailmon.judges.spec.JUDGES`,
`tailmon.proposals.spec.PROPOSALS`, `tailmon.engines.loading.ENGINES`). A plug-in registers under
a name, with how to write it (`syntax`), what it does (`description`) and whatever else its kind
needs (`meta`: a judge's argument rule, an engine's abilities); looking up an unknown name raises
the registry's InputError listing the names it knows; iterating gives the entries in the order they
were registered, for the `list` commands.

An entry holds its object, or a reference "package.module:attribute" imported on first use
(`register_lazy`): the engines import torch or vLLM, so registering them must cost nothing, and
`import tailmon.engines.loading` stays free of both.
"""

from __future__ import annotations

import importlib
import re
from types import MappingProxyType
from typing import Any, Callable, Generic, Iterator, Literal, Mapping, TypeVar

from tailmon.errors import InputError

T = TypeVar("T")

NAME_PATTERN = "[a-z][a-z0-9_]*"
_NAME = re.compile(NAME_PATTERN + r"\Z")


class Entry(Generic[T]):
    """One registered plug-in."""

    def __init__(self, name: str, *, syntax: str, description: str, meta: Mapping[str, Any],
                 value: T | None = None, ref: str | None = None):
        self.name = name
        self.syntax = syntax
        """How a user writes it (`toxicity[:T]`, `lora:PATH[@SCALE]`); the name where nothing more."""
        self.description = description
        self.meta: Mapping[str, Any] = MappingProxyType(dict(meta))
        """What the registry's kind needs to know before using the plug-in."""
        self._value = value
        self._ref = ref

    @property
    def lazy(self) -> bool:
        """Whether the object is still a reference whose module has not been imported."""
        return self._ref is not None

    def load(self) -> T:
        """The registered object; a lazy entry imports its module now (once)."""
        if self._ref is not None:
            module_name, _, qualname = self._ref.partition(":")
            value: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                value = getattr(value, part)
            self._value, self._ref = value, None
        return self._value  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, {self._ref or self._value!r})"


class Registry(Generic[T]):
    """Plug-ins of one kind by name.

    `kind` names them in messages ("judge", "proposal", "engine"); `error` is the InputError
    subclass an unknown name raises (SpecError for spec strings); `known` is what that message
    lists: the names, sorted, or the syntaxes, in registration order (when a name alone does not
    say how to write it).
    """

    def __init__(self, kind: str, *, error: type[InputError] = InputError,
                 known: Literal["names", "syntaxes"] = "names"):
        self.kind = kind
        self.error = error
        self.known = known
        self._entries: dict[str, Entry[T]] = {}

    # -- registering -------------------------------------------------------------------------

    def register(self, name: str, *, syntax: str = "", description: str = "",
                 **meta: Any) -> Callable[[T], T]:
        """Decorator registering its target under `name`; returns the target unchanged.

        A name is registered once (ValueError again: two plug-ins under one name is a bug, not
        a choice between them) and matches [a-z][a-z0-9_]*.
        """

        def decorate(value: T) -> T:
            self._add(Entry(name, syntax=syntax or name, description=description, meta=meta, value=value))
            return value

        return decorate

    def register_lazy(self, name: str, ref: str, *, syntax: str = "", description: str = "", **meta: Any) -> None:
        """Register the object at `ref` ("package.module:attribute", the attribute dotted where it
        lives in a class) without importing its module: the first `load` does."""
        module_name, colon, qualname = ref.partition(":")
        if not (module_name and colon and qualname):
            raise ValueError(f"{self.kind} {name!r}: reference {ref!r} must be 'package.module:attribute'")
        self._add(Entry(name, syntax=syntax or name, description=description, meta=meta, ref=ref))

    def _add(self, entry: Entry[T]) -> None:
        if not _NAME.match(entry.name):
            raise ValueError(f"{self.kind} name {entry.name!r} must match {NAME_PATTERN}")
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} name {entry.name!r} is already registered")
        self._entries[entry.name] = entry

    # -- looking up --------------------------------------------------------------------------

    def get(self, name: str, *, subject: str | None = None) -> Entry[T]:
        """The entry of `name`; `self.error` listing the known ones when there is none.

        `subject`: what the message quotes as unknown, when it is more than the name (a whole
        spec string)."""
        entry = self._entries.get(name)
        if entry is None:
            raise self.error(f"unknown {self.kind} {subject if subject is not None else name!r} "
                             f"(known: {self.known_list()})")
        return entry

    def load(self, name: str) -> T:
        """The object registered under `name` (imported now if it was registered lazily)."""
        return self.get(name).load()

    def known_list(self) -> str:
        """What an unknown-name message lists: sorted names, or syntaxes in registration order."""
        if self.known == "syntaxes":
            return ", ".join(e.syntax for e in self._entries.values())
        return ", ".join(sorted(self._entries))

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def copy(self) -> "Registry[T]":
        """A registry with the same entries that registers on its own (for a test that adds
        plug-ins and must leave the real registry as it was)."""
        other: Registry[T] = Registry(self.kind, error=self.error, known=self.known)
        other._entries = dict(self._entries)
        return other
