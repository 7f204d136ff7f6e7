"""Build the engine a configuration names: transformers (default), in-process vLLM, or a fleet of
OpenAI-compatible vLLM servers.

One entry point, so that `tailmon estimate`, the daemon and `tailmon check` load models the same
way and a user can switch a monitor from the transformers engine to vLLM by one setting
(`model.engine` in the config, `--engine` on the command line). Every engine samples and scores
with processed log-probs on the same token ids (engines/chat.py renders prompts once for all), so
estimates do not depend on the choice, only their cost does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tailmon.errors import InputError, RuntimeFailure

ENGINES = ("transformers", "vllm", "openai")
STEERING_ENGINES = ("transformers",)


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
    enable_lora: bool = False
    """vllm: build the LLM with LoRA support (needed by LoRA proposals; fixed when it is built)."""
    base_urls: tuple[str, ...] = ()
    """openai: the servers' roots, e.g. http://gpu1:8000 (one per replica, or a load balancer)."""
    served_model: str | None = None
    """openai: the base model's served name (`vllm serve --served-model-name`); default: ref."""
    served_adapters: tuple[tuple[str, str], ...] = ()
    """openai: (served adapter name, local adapter folder) pairs, as in `--lora-modules NAME=PATH`."""
    api_key: str | None = None
    max_concurrency: int = 8
    timeout: float = 120.0
    retries: int = 4

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise InputError(f"unknown engine '{self.engine}': choose one of {', '.join(ENGINES)}")
        if self.engine == "openai" and not self.base_urls:
            raise InputError("the openai engine needs the servers' base URLs (base_urls)", setting="base_url")
        if self.engine != "openai" and (self.base_urls or self.served_model or self.served_adapters):
            raise InputError(f"base URLs, served_model and served_adapters are for the openai engine, "
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
    if engine in STEERING_ENGINES:
        return
    for spec in specs:
        if spec.split(":", 1)[0].strip() in ("steer", "ablate"):
            raise InputError(f"proposal '{spec}': steering hooks into the model's decoder layers, which the {engine} "
                             "engine cannot do; use engine 'transformers' for steering proposals")


def load_engine(settings: EngineSettings, *, role: str = ""):
    """The engine for `settings`. A failure is one line naming the role ('candidate', 'baseline')."""
    from tailmon.engines.models import resolve

    try:
        resolve(settings.ref)  # an unknown model is the user's mistake, found before slow imports
        return _load(settings)
    except RuntimeFailure as exc:  # transformers' and vLLM's messages span lines: one line, as every error
        raise RuntimeFailure(f"{role} {' '.join(str(exc).split())}".strip()) from exc
    except InputError as exc:
        raise InputError(f"{role} model: {' '.join(str(exc).split())}".strip()) from exc


def close_engine(engine) -> None:
    """Release what an engine holds outside this process's memory: vLLM's engine-core process,
    the openai engine's connection pool (the transformers engine has nothing to close)."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def _load(s: EngineSettings):
    if s.engine == "transformers":
        from tailmon.engines.transformers_engine import TransformersEngine

        return TransformersEngine.load(s.ref, device=s.device, dtype=s.dtype, batch_size=s.batch_size)
    if s.engine == "vllm":
        from tailmon.engines.vllm import VllmEngine

        return VllmEngine.load(s.ref, dtype=s.dtype, enable_lora=s.enable_lora)
    from tailmon.engines.models import DEFAULT_MODEL
    from tailmon.engines.openai import OpenAIEngine

    ref = s.ref or DEFAULT_MODEL
    engine = OpenAIEngine.connect(list(s.base_urls), s.served_model or ref, ref, model_id=ref,
                                  adapters=dict(s.served_adapters), api_key=s.api_key,
                                  max_concurrency=s.max_concurrency, timeout=s.timeout, retries=s.retries)
    try:
        engine.check_replicas()  # a replica in raw log-prob mode, or none answering, fails here, not mid-run
    except BaseException:
        engine.close()
        raise
    return engine
