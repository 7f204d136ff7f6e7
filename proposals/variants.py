"""The proposal types of this version: another system prompt, a LoRA adapter, another temperature."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tailmon.engines.base import Variant
from tailmon.errors import SpecError

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
        decoding = self._decoding(target)
        return replace(target, name=self.spec, adapter=self.path, adapter_scale=self.scale, decoding=decoding)
