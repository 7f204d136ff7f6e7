"""Typed settings of one estimation: the deployed model, the judge, the proposals, the estimator,
the query volume and the prompt source.

They are pydantic models, so that the daemon's YAML schema (`tailmon.monitor.config`) is built
from them and validates them with its one-line errors, while the plan builder
(`tailmon.estimation.plan`) and the release gate (`tailmon.check`) take them without importing
the daemon. Specs (judge, proposals, decoding, windows) are checked with the same parsers the
estimation uses, so settings that validate do not fail later on a typo.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tailmon.engines.base import Decoding, Variant
from tailmon.engines.loading import EngineSettings, check_proposals
from tailmon.errors import InputError
from tailmon.estimation.pipeline import MAX_SAMPLES
from tailmon.estimation.sources import SourceConfig
from tailmon.estimators import parse_window
from tailmon.judges import parse_judge
from tailmon.proposals import parse_proposal
from tailmon.proposals.adaptive import AdaptiveSettings


def duration_seconds(text: str) -> int:
    """'30s', '5m', '6h', '1d', '1w' -> seconds (the window syntax, also for intervals)."""
    return parse_window(text)


class Strict(BaseModel):
    """Unknown keys are mistakes; settings are values (frozen, hashable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_duration(value: str, what: str) -> str:
    try:
        duration_seconds(value)
    except InputError:
        raise ValueError(f"{what} must be a number and a unit s, m, h, d or w (e.g. 30s, 6h), got {value!r}") from None
    return value


class ModelConfig(Strict):
    """The deployed model exactly as production serves it, and the engine that runs it."""

    ref: str = "smollm2-135m-instruct"
    """The checkpoint; with engine 'openai', a local copy of the served model (its tokenizer)."""
    system_prompt: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = Field(64, ge=1)
    batched_mixture: bool = True
    """transformers: sample a mixture's components in one decode; False: one decode per component
    (the same tokens for the same seeds, slower: for comparison). Not part of the fingerprint."""
    shared_scoring: bool = True
    """transformers: score the components that share a prompt, adapter and steering in one forward
    pass; False: passes per component (the same values to float32 round-off, slower: for
    comparison). Not part of the fingerprint."""
    batched_scoring: bool = True
    """transformers, with shared_scoring: the scoring passes of different system prompts and LoRA
    adapters run in shared batches (each distinct prompt and adapter prefilled once, rows
    left-padded, per-row adapters); False: each pass alone (the same values to float32 round-off:
    for comparison). Not part of the fingerprint."""
    base_urls: tuple[str, ...] = ()
    """openai: the vLLM servers' roots, one per replica (or a load balancer's)."""
    served_model: str | None = None
    """openai: the base model's served name (`--served-model-name`); default: ref."""
    served_adapters: tuple[tuple[str, str], ...] = ()
    """openai: served adapter name -> local adapter folder, as in `--lora-modules NAME=PATH` (a
    mapping in YAML; kept as sorted pairs so that the settings stay hashable)."""
    api_key_env: str | None = None
    """openai: environment variable holding the servers' API key (never the key itself: the
    monitor's settings are stored with every run)."""
    full_rows: bool = False
    """openai: allow scoring that needs full-vocabulary rows over HTTP (the target or a proposal at
    temperature != 1, top-p or top-k), about 100 s per scored response on a CPU server; refused by
    default, naming the cheap alternatives. Not part of the fingerprint (the same values)."""
    max_concurrency: int = Field(8, ge=1)
    request_timeout: float = Field(120.0, gt=0)
    """openai: seconds before a request counts as failed (and goes to the next replica)."""
    retries: int = Field(4, ge=1)

    @field_validator("base_urls")
    @classmethod
    def _urls(cls, urls):
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"a base URL must start with http:// or https://, got {url!r}")
        return urls

    @field_validator("served_adapters", mode="before")
    @classmethod
    def _adapters(cls, value):
        if isinstance(value, dict):
            return tuple(sorted((str(k), str(v)) for k, v in value.items()))
        return value

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, name: str | None) -> str | None:
        if name is not None and not re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", name):
            raise ValueError("api_key_env must be the name of an environment variable (e.g. VLLM_API_KEY)")
        if name is not None and not os.environ.get(name):
            raise ValueError(f"environment variable {name} (the servers' API key) is not set or empty")
        return name

    @model_validator(mode="after")
    def _decoding_valid(self):
        self.decoding()  # Decoding's own checks, with its messages
        self.engine_settings()  # the engine's own checks (base URLs only with openai, ...)
        return self

    def engine_settings(self, *, enable_lora: bool = False) -> EngineSettings:
        try:
            return EngineSettings(
                engine=self.engine, ref=self.ref, device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                batched_mixture=self.batched_mixture, shared_scoring=self.shared_scoring,
                batched_scoring=self.batched_scoring, enable_lora=enable_lora,
                base_urls=self.base_urls, served_model=self.served_model, served_adapters=self.served_adapters,
                full_rows=self.full_rows,
                api_key=os.environ.get(self.api_key_env) if self.api_key_env else None,
                max_concurrency=self.max_concurrency, timeout=self.request_timeout, retries=self.retries)
        except InputError as exc:
            raise ValueError(str(exc)) from None

    def decoding(self) -> Decoding:
        try:
            return Decoding(self.temperature, self.top_p, self.top_k, self.max_new_tokens)
        except InputError as exc:
            raise ValueError(str(exc)) from None

    def target(self) -> Variant:
        return Variant("target", self.decoding(), system_prompt=self.system_prompt)


class ProposalConfig(Strict):
    spec: str
    weight: float = Field(1.0, gt=0)

    @field_validator("spec")
    @classmethod
    def _parses(cls, spec: str) -> str:
        try:
            parse_proposal(spec)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return spec


class EstimatorConfig(Strict):
    method: Literal["is", "mc"] = "is"
    samples: int = Field(200, ge=1, le=MAX_SAMPLES)
    """Samples per prompt (at most MAX_SAMPLES)."""
    defensive: float = Field(0.1, ge=0, lt=1)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    """Base seed; each run derives its own from it and the run id, so runs differ but replay."""
    store_samples: bool = False
    """Keep every sample (response, score, weight) in the store; off by default (volume)."""
    rescore_samples: int = Field(8, ge=0)
    """Samples per prompt scored again under the component that drew them, to check the
    sampled log-probs against the scored ones (0: no check); the estimate warns on a mismatch."""
    rescore_tolerance: float = Field(0.01, gt=0, allow_inf_nan=False)
    """Nats per response: a larger |sampled - scored| log-prob is a warning (derived in
    tailmon.estimation.pipeline.RESCORE_TOLERANCE)."""


class AdaptiveConfig(Strict):
    """A monitor whose proposal learns across runs (`tailmon.proposals.adaptive`)."""

    enabled: bool | None = None
    """None: on for a monitor with method 'is' and no proposals (`proposals: adaptive` says so
    explicitly); true with proposals: they are the starting components instead of the library's."""
    state_dir: str | None = None
    """Where the learnt state lives; default $TAILMON_STATE_DIR/adaptive/<monitor>."""
    steps: int = Field(20, ge=1)
    time_share: float = Field(0.5, gt=0, allow_inf_nan=False)
    holdout: float = Field(0.5, gt=0, lt=1)
    rank: int = Field(4, ge=1)
    alpha: float = Field(8.0, gt=0, allow_inf_nan=False)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    batch_size: int = Field(8, ge=1)
    kl: float = Field(0.25, ge=0, allow_inf_nan=False)
    hot_temperature: float | None = Field(None, gt=0, allow_inf_nan=False)

    def learner_settings(self) -> AdaptiveSettings:
        return AdaptiveSettings(**self.model_dump(exclude={"enabled", "state_dir"}))


class VolumeConfig(Strict):
    per_day: float = Field(ge=0, allow_inf_nan=False)
    """Queries per day the deployed model answers (the monitor's traffic)."""
    windows: tuple[str, ...] = ("1h", "1d", "7d")

    @field_validator("windows")
    @classmethod
    def _windows(cls, windows):
        if not windows:
            raise ValueError("give at least one window, e.g. [1d]")
        return tuple(check_duration(w, "a window") for w in windows)


class EstimationSettings(Strict):
    """What one estimation is of: the deployed model, its prompts, the judge, the proposals, the
    estimator and the query volume (a monitor's estimand; `tailmon.monitor.config.MonitorConfig`
    adds its schedule and alert rules)."""

    name: str
    model: ModelConfig = ModelConfig()
    prompts: SourceConfig
    judge: str
    proposals: tuple[ProposalConfig, ...] = ()
    estimator: EstimatorConfig = EstimatorConfig()
    volume: VolumeConfig | None = None
    adaptive: AdaptiveConfig = AdaptiveConfig()

    @model_validator(mode="before")
    @classmethod
    def _adaptive_shorthand(cls, data):
        # `proposals: adaptive`: no fixed proposals, and the monitor learns its own.
        if isinstance(data, dict) and data.get("proposals") == "adaptive":
            data = dict(data)
            data["proposals"] = []
            adaptive = data.get("adaptive")
            data["adaptive"] = {**(adaptive if isinstance(adaptive, dict) else {}), "enabled": True}
        return data

    @property
    def is_adaptive(self) -> bool:
        """Whether the monitor learns its proposal across runs."""
        if self.adaptive.enabled is None:
            # Learning an adapter needs the weights in this process: the transformers engine.
            return self.estimator.method == "is" and not self.proposals and self.model.engine == "transformers"
        return self.adaptive.enabled

    @field_validator("judge")
    @classmethod
    def _judge(cls, spec: str) -> str:
        try:
            parse_judge(spec)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return spec

    @field_validator("proposals", mode="before")
    @classmethod
    def _plain_specs(cls, value):
        # A bare string is a component with weight 1: `proposals: ["system:..."]`.
        if isinstance(value, list):
            return [{"spec": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _method_needs(self):
        # method 'is' without proposals uses the shipped library of adversarial system prompts for
        # the categories of each run's prompts (tailmon.proposals.default_proposals).
        if self.estimator.method == "mc" and self.proposals:
            raise ValueError("estimator.method 'mc' samples the target only: remove the proposals")
        if self.estimator.method == "mc" and self.adaptive.enabled:
            raise ValueError("adaptive.enabled: a monitor with estimator.method 'mc' draws no proposal to adapt")
        if self.is_adaptive and self.model.engine != "transformers":
            if self.adaptive.enabled:
                raise ValueError(f"adaptive.enabled: learning an adapter needs the transformers engine, "
                                 f"not {self.model.engine}")
        try:
            check_proposals(self.model.engine, [p.spec for p in self.proposals])
            # Each proposal as a run builds it (a LoRA folder that is not there, a proposal that
            # would truncate where the target does not): a config that validates must run.
            target = self.model.target()
            for p in self.proposals:
                parse_proposal(p.spec).variant(target)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return self

    def engine_settings(self, model: ModelConfig | None = None) -> EngineSettings:
        """How to load `model` (default: these settings' own) for these proposals: a vLLM
        engine is built with LoRA support only when a proposal needs it."""
        lora = any(p.spec.split(":", 1)[0].strip() == "lora" for p in self.proposals) or self.is_adaptive
        return (model or self.model).engine_settings(enable_lora=lora)
