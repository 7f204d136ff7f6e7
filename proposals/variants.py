"""The proposal types of this version: another system prompt, a LoRA adapter, another temperature,
an activation-steering direction added to or ablated from the residual stream, a token tilt (a
bias over the vocabulary), and any of these drawing only the first K tokens before returning to
the target."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from tailmon.engines.adapters import ADAPTER_METADATA, read_adapter_metadata
from tailmon.engines.base import STEERING_KINDS, Steering, Tilt, Variant
from tailmon.engines.steering import load_direction
from tailmon.engines.tilt import load_tilt
from tailmon.errors import InputError, SpecError

from .base import Proposal


@dataclass(frozen=True)
class SystemPromptProposal(Proposal):
    """The target conditioned on an adversarial system prompt; p is still scored without it."""

    text: str

    @property
    def spec(self) -> str:
        return f"system:{self.text}"

    def variant(self, target: Variant) -> Variant:
        decoding = self._decoding(target)
        return replace(target, name=self.spec, system_prompt=self.text, decoding=decoding)


@dataclass(frozen=True)
class TemperatureProposal(Proposal):
    """The target at another temperature (usually higher: flatter, so rare responses get common)."""

    temperature: float

    def __post_init__(self):
        if not self.temperature > 0:
            raise SpecError(f"proposal 'temperature:{self.temperature}': temperature must be > 0")

    @property
    def spec(self) -> str:
        return f"temperature:{self.temperature:g}"

    def covers_truncation(self, target: Variant) -> bool:
        # Same context, same ordering of the vocabulary: top-k keeps the same set at any
        # temperature, and a hotter distribution needs at least as many of the sorted tokens to
        # reach the top-p mass, so its nucleus contains the target's. A colder one does not.
        return self.temperature >= target.decoding.temperature

    def variant(self, target: Variant) -> Variant:
        decoding = self._decoding(target, temperature=self.temperature)
        return replace(target, name=self.spec, decoding=decoding)


@dataclass(frozen=True)
class LoraProposal(Proposal):
    """The target with a peft LoRA adapter (trained to produce the behaviour) at a scale."""

    path: str
    scale: float = 1.0

    @property
    def spec(self) -> str:
        return f"lora:{self.path}" + (f"@{self.scale:g}" if self.scale != 1.0 else "")

    def variant(self, target: Variant) -> Variant:
        if not (Path(self.path) / "adapter_config.json").is_file():
            raise SpecError(f"proposal '{self.spec}': no LoRA adapter (adapter_config.json) at {self.path}")
        if (Path(self.path) / ADAPTER_METADATA).is_file():
            # Only its form here; whether it fits the model is the engine's check when it loads it.
            try:
                read_adapter_metadata(self.path)
            except InputError as exc:
                raise SpecError(f"proposal '{self.spec}': {exc}") from None
        decoding = self._decoding(target)
        return replace(target, name=self.spec, adapter=self.path, adapter_scale=self.scale, decoding=decoding)


def format_layers(layers: tuple[int, ...]) -> str:
    """(8, 9, 10, 12) -> "8-10,12": the spec's own LAYERS syntax."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class SteeringProposal(Proposal):
    """The target with its residual stream edited along a saved direction (`tailmon proposals steer`).

    kind `add` adds coef * v at each of `layers`; kind `ablate` removes coef times the component
    along r = v / |v| there (coef 1: the model can no longer write along r at those layers). v is
    the difference of means at the layer saved in the file, the same vector at every hooked layer.
    """

    kind: str
    path: str
    coef: float
    layers: tuple[int, ...] | None = None
    """None: the layer saved with the direction."""

    def __post_init__(self):
        if self.kind not in STEERING_KINDS:
            raise SpecError(f"steering kind must be one of {', '.join(STEERING_KINDS)}, got '{self.kind}'")
        if not math.isfinite(self.coef):
            raise SpecError(f"proposal '{self.spec}': the coefficient must be finite")

    @property
    def spec(self) -> str:
        name = "steer" if self.kind == "add" else "ablate"
        return f"{name}:{self.path}@{self.coef:g}" + (f"@{format_layers(self.layers)}" if self.layers else "")

    def variant(self, target: Variant) -> Variant:
        try:
            file = load_direction(self.path)
            steering = Steering(self.kind, self.path, self.coef, self.layers or (file.layer,))
        except InputError as exc:
            raise SpecError(f"proposal '{self.spec}': {exc}") from None
        beyond = [layer for layer in steering.layers if layer >= file.num_layers]
        if beyond:
            raise SpecError(f"proposal '{self.spec}': layer {beyond[0]} is beyond the {file.num_layers} layers "
                            f"the direction was computed on (0..{file.num_layers - 1})")
        decoding = self._decoding(target)
        return replace(target, name=self.spec, steering=steering, decoding=decoding)


@dataclass(frozen=True)
class TiltProposal(Proposal):
    """The target with a token tilt (`tailmon.engines.tilt`): scale times the file's bias added to
    every processed next-token distribution, renormalised. Usually fitted to a monitor's hits
    (`tailmon proposals fit-tilt`, or an adaptive monitor after each run)."""

    path: str
    scale: float = 1.0

    @property
    def spec(self) -> str:
        return f"tilt:{self.path}" + (f"@{self.scale:g}" if self.scale != 1.0 else "")

    def covers_truncation(self, target: Variant) -> bool:
        # The bias is added after the target's truncation, so the support is the target's own.
        return True

    def variant(self, target: Variant) -> Variant:
        try:
            load_tilt(self.path)  # its form now; whether its ids fit the model is the engine's check
            tilt = Tilt(self.path, self.scale)
        except InputError as exc:
            raise SpecError(f"proposal '{self.spec}': {exc}") from None
        return replace(target, name=self.spec, tilt=tilt, decoding=self._decoding(target))


@dataclass(frozen=True)
class ReturnProposal(Proposal):
    """Another proposal for the first K response tokens, the target for the rest (`return:K:SPEC`).

    Its density is q(y_1..K) p(y_K+1.. | y_1..K), so its ratio to the target, p(y)/q(y), is
    p(y_1..K)/q(y_1..K): the tokens after K, drawn from the target itself, add nothing to the
    weight's spread (a full-length proposal multiplies the weight by p/q of every later token).
    The continuation is drawn under the target's own prompt, weights and decoding.
    """

    inner: Proposal
    k: int

    def __post_init__(self):
        if isinstance(self.inner, ReturnProposal):
            raise SpecError(f"proposal '{self.spec}': a proposal returns to the target once; write one return:K")
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise SpecError(f"proposal 'return:{self.k}:{self.inner.spec}': K must be an integer >= 1")

    @property
    def spec(self) -> str:
        return f"return:{self.k}:{self.inner.spec}"

    def covers_truncation(self, target: Variant) -> bool:
        return self.inner.covers_truncation(target)

    def variant(self, target: Variant) -> Variant:
        head = self.inner.variant(target)
        return replace(head, name=self.spec, returns_after=self.k, continuation=target)
