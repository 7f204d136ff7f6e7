"""Proposal spec strings (DESIGN section 8): `system:TEXT`, `temperature:T`, `lora:PATH[@SCALE]`,
`steer:PATH@COEF[@LAYERS]`, `ablate:PATH@ALPHA[@LAYERS]`, `tilt:PATH[@SCALE]`, and `return:K:SPEC` (SPEC for the first
K response tokens, the target for the rest).

Every kind is an entry of `PROPOSALS` (a `tailmon.registry.Registry`): `NAME:ARG` is built by the
factory registered under NAME, `factory(spec, ARG) -> Proposal`, which raises SpecError naming the
spec for a bad ARG. A new kind registers with `@PROPOSALS.register(NAME, syntax=..., description=...)`.
"""

from __future__ import annotations

import math
import re
from typing import Callable

from tailmon.errors import SpecError
from tailmon.registry import Registry

from .base import Proposal
from .variants import (LoraProposal, ReturnProposal, SteeringProposal, SystemPromptProposal, TemperatureProposal,
                       TiltProposal)

_LAYERS = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_RETURN = re.compile(r"^(\d+):(.+)$", re.DOTALL)

# An unknown kind lists the syntaxes: a bare name does not say how to write its argument.
PROPOSALS: Registry[Callable[[str, str], Proposal]] = Registry("proposal", error=SpecError, known="syntaxes")


def _number(spec: str, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SpecError(f"proposal '{spec}': {what} must be a number, got '{text}'") from None


@PROPOSALS.register("system", syntax="system:TEXT",
                    description="the target with another (adversarial) system prompt")
def _system(spec: str, arg: str) -> Proposal:
    return SystemPromptProposal(arg)


@PROPOSALS.register("temperature", syntax="temperature:T", description="the target at temperature T")
def _temperature(spec: str, arg: str) -> Proposal:
    return TemperatureProposal(_number(spec, arg, "temperature"))


def _path_scale(arg: str) -> tuple[str, float]:
    """PATH[@SCALE]: a path may itself hold '@', so only a numeric tail is a scale."""
    path, scale = arg, 1.0
    head, sep, tail = arg.rpartition("@")
    if sep:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    return path, scale


@PROPOSALS.register("lora", syntax="lora:PATH[@SCALE]",
                    description="the target with a peft LoRA adapter, optionally scaled")
def _lora(spec: str, arg: str) -> Proposal:
    path, scale = _path_scale(arg)
    if not path:
        raise SpecError(f"proposal '{spec}': LoRA needs a path")
    return LoraProposal(path, scale)


def parse_layers(spec: str, text: str) -> tuple[int, ...]:
    """`8,9,10`, `8-12` or a mix (`2,8-12`) -> sorted distinct layer indices."""
    if not _LAYERS.match(text):
        raise SpecError(f"proposal '{spec}': LAYERS must look like 8,9,10 or 8-12, got '{text}'")
    layers: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if hi < lo:
            raise SpecError(f"proposal '{spec}': layer range '{part}' runs backwards")
        layers.update(range(lo, hi + 1))
    return tuple(sorted(layers))


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _steering(kind: str, what: str) -> Callable[[str, str], Proposal]:
    def parse(spec: str, arg: str) -> Proposal:
        # PATH@COEF[@LAYERS], read from the right: a path may itself hold '@', the two fields not.
        parts = arg.split("@")
        if len(parts) >= 3 and _finite(parts[-2]):
            path, coef, layers = "@".join(parts[:-2]), float(parts[-2]), parse_layers(spec, parts[-1])
        elif len(parts) >= 2 and _finite(parts[-1]):
            path, coef, layers = "@".join(parts[:-1]), float(parts[-1]), None
        else:
            syntax = PROPOSALS.get("steer" if kind == "add" else "ablate").syntax
            raise SpecError(f"proposal '{spec}' needs a numeric {what} after the path: {syntax}")
        if not path:
            raise SpecError(f"proposal '{spec}': steering needs the path of a direction file")
        return SteeringProposal(kind, path, coef, layers)

    return parse


PROPOSALS.register("steer", syntax="steer:PATH@COEF[@LAYERS]",
                   description="the target with COEF times a saved direction added to the residual stream at LAYERS "
                   "(default: the file's layer)")(_steering("add", "COEF"))
PROPOSALS.register("ablate", syntax="ablate:PATH@ALPHA[@LAYERS]",
                   description="the target with ALPHA times a saved direction's component removed at LAYERS "
                   "(1: all of it)")(_steering("ablate", "ALPHA"))


@PROPOSALS.register("tilt", syntax="tilt:PATH[@SCALE]",
                    description="the target with a token tilt: a bias over the vocabulary from a tilt file "
                    "(`tailmon proposals fit-tilt`), times SCALE, added to every next-token distribution")
def _tilt(spec: str, arg: str) -> Proposal:
    path, scale = _path_scale(arg)
    if not path:
        raise SpecError(f"proposal '{spec}': a tilt needs the path of a tilt file")
    if not math.isfinite(scale):
        raise SpecError(f"proposal '{spec}': SCALE must be a finite number")
    return TiltProposal(path, scale)


@PROPOSALS.register("return", syntax="return:K:SPEC",
                    description="SPEC (any other proposal) draws the first K response tokens, the target "
                    "the rest; weights and scoring then involve only the first K tokens")
def _return(spec: str, arg: str) -> Proposal:
    # K first, then the inner spec whole: the inner spec may hold any character, K only digits.
    m = _RETURN.match(arg)
    if not m:
        raise SpecError(f"proposal '{spec}' needs a token count and a proposal: return:K:SPEC "
                        "(e.g. return:4:system:TEXT)")
    k = int(m.group(1))
    if k < 1:
        raise SpecError(f"proposal '{spec}': K must be >= 1 (return:0 is the target itself)")
    inner = parse_proposal(m.group(2))
    if isinstance(inner, ReturnProposal):
        raise SpecError(f"proposal '{spec}': a proposal returns to the target once; write one return:K")
    return ReturnProposal(inner, k)


def parse_proposal(spec: str) -> Proposal:
    name, sep, arg = spec.partition(":")
    kind = PROPOSALS.get(name.strip(), subject=spec)  # unknown: SpecError listing every kind's syntax
    if not sep or not arg:
        raise SpecError(f"proposal '{spec}' needs an argument: {kind.syntax}")
    return kind.load()(spec, arg)
