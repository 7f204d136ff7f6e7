"""Proposal spec strings (DESIGN section 8): `system:TEXT`, `temperature:T`, `lora:PATH[@SCALE]`."""

from __future__ import annotations

from typing import Callable

from tailmon.errors import SpecError

from .base import Proposal
from .variants import LoraProposal, SystemPromptProposal, TemperatureProposal


def _number(spec: str, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SpecError(f"proposal '{spec}': {what} must be a number, got '{text}'") from None


def _system(spec: str, arg: str) -> Proposal:
    return SystemPromptProposal(arg)


def _temperature(spec: str, arg: str) -> Proposal:
    return TemperatureProposal(_number(spec, arg, "temperature"))


def _lora(spec: str, arg: str) -> Proposal:
    path, scale = arg, 1.0
    head, sep, tail = arg.rpartition("@")
    if sep:  # PATH@SCALE; a path may itself hold '@', so only a numeric tail is a scale
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not path:
        raise SpecError(f"proposal '{spec}': LoRA needs a path")
    return LoraProposal(path, scale)


PROPOSALS: dict[str, tuple[str, str, Callable[[str, str], Proposal]]] = {
    "system": ("system:TEXT", "the target with another (adversarial) system prompt", _system),
    "temperature": ("temperature:T", "the target at temperature T", _temperature),
    "lora": ("lora:PATH[@SCALE]", "the target with a peft LoRA adapter, optionally scaled", _lora),
}


def parse_proposal(spec: str) -> Proposal:
    name, sep, arg = spec.partition(":")
    name = name.strip()
    if name not in PROPOSALS:
        known = ", ".join(s for s, _, _ in PROPOSALS.values())
        raise SpecError(f"unknown proposal '{spec}': known kinds are {known}")
    if not sep or not arg:
        raise SpecError(f"proposal '{spec}' needs an argument: {PROPOSALS[name][0]}")
    return PROPOSALS[name][2](spec, arg)
