"""The library of adversarial system prompts per harm category (data/system_prompts.yaml), and
the proposals a monitor uses when its config names none.

`default_proposals(categories)` gives, for the categories of a monitor's prompts, the first
prompt of each category's library entry as a `system:` spec, the general one first, then the
others in the order of the category names: the same set of categories always gives the same list
in the same order (component order fixes the samples' seeds, so runs stay replayable).
Categories are matched through the library's aliases (StrongREJECT's and HarmBench's names among
them), case-insensitively with punctuation and spaces ignored; None and unknown names use the
default category.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Iterable

from tailmon.errors import InputError

FORMAT = "tailmon-system-prompts/1"
FILE = "system_prompts.yaml"


@dataclass(frozen=True)
class Library:
    default: str
    prompts: dict[str, tuple[str, ...]]
    """category -> its system prompts, the first one being the default proposal's."""
    descriptions: dict[str, str]
    aliases: dict[str, str]
    """normalised alias -> category."""

    def category(self, name: str | None) -> str:
        """The library category a prompt set's category name stands for."""
        if name is None:
            return self.default
        key = _normalise(name)
        if key in self.aliases:
            return self.aliases[key]
        return self.default


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", str(name).lower())


def parse_library(data, source: str) -> Library:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{source}: not a '{FORMAT}' system-prompt library")
    cats = data.get("categories")
    if not isinstance(cats, dict) or not cats:
        raise InputError(f"{source}: 'categories' must map names to entries")
    prompts, descriptions = {}, {}
    for name, entry in cats.items():
        texts = entry.get("prompts") if isinstance(entry, dict) else None
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise InputError(f"{source}: category '{name}' needs a non-empty list of prompt strings")
        prompts[str(name)] = tuple(texts)
        descriptions[str(name)] = str(entry.get("description", ""))
    default = data.get("default")
    if default not in prompts:
        raise InputError(f"{source}: default category '{default}' is not one of the categories")
    aliases = {_normalise(name): name for name in prompts}
    for name, names in (data.get("aliases") or {}).items():
        if name not in prompts or not isinstance(names, list):
            raise InputError(f"{source}: aliases of '{name}' must be a list, for one of the categories")
        for alias in names:
            key = _normalise(alias)
            if aliases.setdefault(key, name) != name:
                raise InputError(f"{source}: alias '{alias}' is given to both '{aliases[key]}' and '{name}'")
    return Library(default, prompts, descriptions, aliases)


@functools.lru_cache(maxsize=1)
def load_library() -> Library:
    """The shipped library (package data of tailmon.proposals)."""
    import yaml

    text = resources.files("tailmon.proposals").joinpath("data", FILE).read_text(encoding="utf-8")
    return parse_library(yaml.safe_load(text), f"tailmon.proposals/data/{FILE}")


def default_proposals(categories: Iterable[str | None]) -> list[str]:
    """Proposal specs for a monitor whose config names none: one `system:` spec per library
    category the prompts' categories map to, plus the general one, in a fixed order."""
    lib = load_library()
    wanted = {lib.category(c) for c in categories} | {lib.default}
    order = [lib.default] + sorted(wanted - {lib.default})
    return list(dict.fromkeys(f"system:{lib.prompts[c][0]}" for c in order))
