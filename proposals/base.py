"""Proposals: deliberately unsafe variants of the target, and the mixture they are drawn from.

A proposal turns the target `Variant` into another `Variant` of the same model; the engine
realises it. The mixture always keeps the target as component 0 (with the defensive share, which
may be 0) because every sample needs log p under the target anyway.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Sequence

from tailmon.engines.base import Decoding, Variant
from tailmon.errors import InputError


class Proposal(ABC):
    """One unsafe variant of the target."""

    spec: str

    @abstractmethod
    def variant(self, target: Variant) -> Variant:
        """The component's distribution, derived from the deployed target."""

    def covers_truncation(self, target: Variant) -> bool:
        """Whether sampling with the target's own truncation keeps every token the target can draw.

        Only then may the proposal truncate: a proposal whose support misses part of the target's
        support gives weights that silently miss that part of the probability. Variants that change
        the context or the weights reorder the vocabulary, so by default they cannot truncate.
        """
        return False

    def _decoding(self, target: Variant, **overrides) -> Decoding:
        """The target's decoding with overrides, untruncated unless truncation is known safe."""
        decoding = replace(target.decoding, **overrides)
        if target.decoding.truncates and not self.covers_truncation(target):
            return decoding.untruncated()
        return decoding


@dataclass(frozen=True)
class Component:
    """A mixture component: a variant and its share of the samples."""

    label: str
    variant: Variant
    share: float
    note: str | None = None  # e.g. why its truncation was dropped


def build_mixture(target: Variant, proposals: Sequence[Proposal], defensive: float,
                  weights: Sequence[float] | None = None) -> list[Component]:
    """Component 0 is the target with share `defensive`; the proposals share the rest.

    Without explicit `weights` every proposal gets an equal part of 1 - defensive (the CLI's rule);
    with them, the weights are relative shares of 1 - defensive (a config's rule).
    """
    if not proposals:
        raise InputError("importance sampling needs at least one proposal, or use method mc", setting="proposal")
    if not (0 <= defensive < 1):
        raise InputError(f"defensive share must be in [0, 1), got {defensive}", setting="defensive")
    if weights is None:
        weights = [1.0] * len(proposals)
    if len(weights) != len(proposals) or any(w <= 0 for w in weights):
        raise InputError("every proposal weight must be > 0, one per proposal")
    total = float(sum(weights))
    components = [Component("target", target, float(defensive))]
    for proposal, w in zip(proposals, weights):
        variant = proposal.variant(target)
        note = None
        if target.decoding.truncates and not variant.decoding.truncates:
            note = f"{proposal.spec}: samples without top-p/top-k so its support covers the target's"
        components.append(Component(proposal.spec, variant, (1 - defensive) * w / total, note))
    return components
