"""The engine contract: two primitives, sample and score, over token ids.

Importance sampling needs exactly two things from a model: draw responses with the log-probability
of each under the distribution that drew it, and compute the log-probability of given responses
under another distribution (teacher forcing). Both go through token ids, never re-tokenised text,
and both use the *processed* distribution of `Decoding` (temperature, then top-k, then top-p,
renormalised), so that the two sides of every weight are the same function (DESIGN section 1).
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Iterator, Protocol, Sequence

import numpy as np

from tailmon.errors import InputError


@dataclass(frozen=True)
class Decoding:
    """Deployed decoding settings. tailmon's own defaults: never taken from a generation_config."""

    temperature: float = 1.0
    """Softmax temperature, > 0. Greedy decoding (0) has no density to weight and is refused."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 means no nucleus truncation."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 means off."""
    max_new_tokens: int = 64
    """Responses are cut here identically under every distribution."""

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")

    @property
    def truncates(self) -> bool:
        return self.top_p < 1 or self.top_k > 0

    def untruncated(self) -> "Decoding":
        return replace(self, top_p=1.0, top_k=0)


STEERING_KINDS = ("add", "ablate")


@dataclass(frozen=True)
class Steering:
    """An edit of the residual stream, applied at every position of every sequence of a pass.

    `add`: x + coef * v; `ablate`: x - coef * (x . r) r with r = v / |v| (coef 1 removes the
    component along r). v is the direction saved in the file at `path` (`tailmon proposals steer`):
    the difference of means at the file's own layer, the same vector at every hooked layer.
    """

    kind: str
    path: str
    coef: float
    layers: tuple[int, ...] | None = None
    """Decoder layers whose outputs are edited (0-based); None: the layer saved with the direction."""

    def __post_init__(self):
        if self.kind not in STEERING_KINDS:
            raise InputError(f"steering kind must be one of {', '.join(STEERING_KINDS)}, got '{self.kind}'")
        if not (isinstance(self.coef, (int, float)) and math.isfinite(self.coef)):
            raise InputError(f"steering coefficient must be a finite number, got {self.coef}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(l, bool) or int(l) != l or l < 0 for l in layers):
                raise InputError(f"steering layers must be integers >= 0, got {self.layers}")
            # Normalised so that equal edits are equal (and hash alike) however they were written.
            object.__setattr__(self, "layers", tuple(sorted({int(l) for l in layers})))
        object.__setattr__(self, "coef", float(self.coef))


@dataclass(frozen=True)
class Tilt:
    """A token tilt (`tailmon.engines.tilt`): scale times the bias saved in the file at `path`,
    added to the processed next-token log-probs, which are then renormalised."""

    path: str
    scale: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise InputError(f"token tilt scale must be a finite number, got {self.scale}")
        object.__setattr__(self, "scale", float(self.scale))


@dataclass(frozen=True)
class Variant:
    """One distribution over responses to a prompt: which weights, which context, which decoding.

    The target is a Variant (the deployed model as production serves it); every proposal component
    is another Variant of the same model, so one engine scores a sample under all of them.
    """

    name: str
    decoding: Decoding = field(default_factory=Decoding)
    system_prompt: str | None = None
    """None: whatever the chat template does without a system message (SmolLM2 adds its default)."""
    adapter: str | None = None
    """Path to a peft LoRA adapter applied on top of the target weights; None for the base weights."""
    adapter_scale: float = 1.0
    steering: Steering | None = None
    """An activation edit applied during every forward pass of this variant; None for none."""
    tilt: Tilt | None = None
    """A bias over the vocabulary applied to every processed next-token distribution of this
    variant (after temperature and truncation, then renormalised); None for none."""
    returns_after: int | None = None
    """Return to the target: this variant draws only the first `returns_after` response tokens
    (K); every later token comes from `continuation` (the target), conditioned on the prompt as
    the target renders it and the K tokens. Its density is q(y_1..K) p(y_K+1.. | y_1..K), which
    `Engine.sample` and `Engine.score` return for it. None: every token from this variant."""
    continuation: "Variant | None" = None
    """The variant that draws the tokens after the first `returns_after` (the deployed target)."""

    def __post_init__(self):
        if (self.returns_after is None) != (self.continuation is None):
            raise InputError(f"variant '{self.name}': returns_after and continuation go together")
        if self.returns_after is not None:
            k = self.returns_after
            if isinstance(k, bool) or int(k) != k or k < 1:
                raise InputError(f"variant '{self.name}': returns_after must be an integer >= 1, got {k}")
            if self.continuation.returns_after is not None:
                raise InputError(f"variant '{self.name}': its continuation must itself draw every token")
            if self.continuation.decoding.max_new_tokens != self.decoding.max_new_tokens:
                # Responses are cut at one length under every distribution (DESIGN section 1).
                raise InputError(f"variant '{self.name}': max_new_tokens {self.decoding.max_new_tokens} differs "
                                 f"from its continuation's {self.continuation.decoding.max_new_tokens}")
            object.__setattr__(self, "returns_after", int(k))

    @property
    def returns(self) -> bool:
        """Whether this variant returns to the target after its first `returns_after` tokens."""
        return self.returns_after is not None

    @property
    def head(self) -> "Variant":
        """The variant that draws the first `returns_after` tokens: this one without the return,
        cut at K tokens (itself when it does not return)."""
        if self.returns_after is None:
            return self
        cut = replace(self.decoding, max_new_tokens=min(self.returns_after, self.decoding.max_new_tokens))
        return replace(self, decoding=cut, returns_after=None, continuation=None)


@dataclass
class Samples:
    """Responses drawn from one variant for one prompt."""

    token_ids: list[list[int]]
    """Response token ids, the stop token included when one was generated."""
    logprobs: np.ndarray
    """Sum of processed log-probs of each response under the variant that drew it, float64."""
    finished: list[bool]
    """True when the response ended with a stop token, False when max_new_tokens cut it."""
    token_logprobs: list[np.ndarray] | None = None
    """Per response, the processed log-prob of each of its tokens (float64; they sum to
    `logprobs`), when the engine gives them; None when it does not. Lets a caller take the
    log-prob of the first tokens only (`tailmon.proposals.sampling.draw` with components that
    return to the target) without scoring the samples again."""

    def __len__(self) -> int:
        return len(self.token_ids)


class Engine(ABC):
    """Runs one model (the target checkpoint) and every variant of it."""

    name: str = "engine"

    @abstractmethod
    def sample(self, prompt: str, variant: Variant, n: int, seed: int) -> Samples:
        """Draw n responses to `prompt` from `variant`, reproducibly for a given seed."""

    def sample_mixture(self, prompt: str, variants: Sequence[Variant], counts: Sequence[int],
                       seeds: Sequence[int]) -> list[Samples]:
        """`sample(prompt, variants[j], counts[j], seeds[j])` for every j (each count >= 1): the
        draws of a whole mixture. An engine may run them as one batch (the transformers engine
        does), provided each component's responses have the distribution, and for a given seed
        the values, that `sample` gives them: the default calls `sample` once per component."""
        if not (len(variants) == len(counts) == len(seeds)):
            raise InputError(f"sample_mixture: {len(variants)} variants, {len(counts)} counts and {len(seeds)} seeds")
        out = []
        for v, n, s in zip(variants, counts, seeds):
            t0 = time.perf_counter()
            samples = self.sample(prompt, v, n, s)
            samples.seconds = time.perf_counter() - t0
            out.append(samples)
        return out

    @abstractmethod
    def score(self, prompt: str, variant: Variant, responses: Sequence[Sequence[int]]) -> np.ndarray:
        """Processed log-prob (float64, summed over response tokens) of each response under `variant`.

        -inf where a token lies outside the variant's truncated support.
        """

    def score_many(self, prompt: str, variants: Sequence[Variant], responses: Sequence[Sequence[int]],
                   need: np.ndarray | None = None) -> np.ndarray:
        """`score` of every response under every variant at once: (n, len(variants)) float64.

        `need` (n, len(variants)) bool says which entries the caller reads; the others are NaN
        (never computed, or dropped: an engine may compute more where that costs nothing). None:
        every entry. The default scores each variant on the rows that need it, one `score` call per
        variant; an engine that can share work between variants (one forward pass for variants
        that differ only in decoding) overrides it, with the same values to float round-off."""
        need = score_need(need, len(responses), len(variants))
        out = np.full(need.shape, np.nan)
        for j, variant in enumerate(variants):
            rows = np.flatnonzero(need[:, j])
            if rows.size:
                out[rows, j] = self.score(prompt, variant, [responses[i] for i in rows])
        return out

    @abstractmethod
    def next_token_logprobs(self, prompt: str, variant: Variant, prefixes: Sequence[Sequence[int]]) -> np.ndarray:
        """Processed log-probs over the vocabulary of the token following each response prefix, (b, V)."""

    def position_logprobs(self, prompt: str, variant: Variant, responses: Sequence[Sequence[int]],
                          columns: Sequence[int]) -> list[np.ndarray]:
        """For each response, the processed log-probs of the tokens `columns` at each of its
        positions (before each of its tokens): a (len, len(columns)) array per response, what
        fitting a token tilt reads. The default asks `next_token_logprobs` for every prefix (a
        pass per prefix); an engine that can does one pass per response."""
        cols = np.asarray(columns, dtype=int)
        out = []
        for r in responses:
            r = list(r)
            rows = self.next_token_logprobs(prompt, variant, [r[:t] for t in range(len(r))]) if r else None
            out.append(np.zeros((0, len(cols))) if rows is None else rows[:, cols])
        return out

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Response text as a judge sees it (stop tokens dropped)."""

    @abstractmethod
    def token_text(self, token_id: int) -> str:
        """Text of one token when it appears inside a response (for exact prefix computations)."""

    @property
    @abstractmethod
    def stop_token_ids(self) -> frozenset[int]:
        """Tokens that end a response."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        ...

    @property
    def model_id(self) -> str:
        """What a report should call the model."""
        return self.name

    # -- optional abilities ------------------------------------------------------------------
    # Every engine has these, with the defaults below for one that lacks the ability, so that
    # callers call them rather than probe with hasattr/getattr.

    returns_to_target = False
    """Whether `sample`, `score` and `next_token_logprobs` realise a variant that returns to the
    target (`Variant.returns_after`). An engine without the ability refuses such a variant with
    an InputError (`refuse_return`), never draws it as if it did not return."""

    def refuse_return(self, variant: Variant) -> None:
        """For engines that cannot draw a continuation from the target: refuse a returning variant."""
        if variant.returns_after is not None:
            raise InputError(f"proposal '{variant.name}' returns to the target after {variant.returns_after} tokens, "
                             f"which the {self.name} engine cannot draw; use the transformers engine")

    tilts = False
    """Whether the engine realises a variant's token tilt (`Variant.tilt`). One that cannot
    refuses such a variant (`refuse_tilt`), never draws it untilted."""

    def refuse_tilt(self, variant: Variant) -> None:
        if variant.tilt is not None:  # a returning variant's head keeps its tilt
            raise InputError(f"proposal '{variant.name}' tilts the next-token distribution, which the "
                             f"{self.name} engine cannot do exactly; use the transformers engine")

    tokenizer = None
    """The transformers tokenizer prompts are rendered with (every `ChatEngine` has one); None
    for an engine that has none."""

    def check_prompt(self, prompt: str, variant: "Variant") -> None:
        """Raise InputError when `prompt`, as `variant` renders it, cannot be answered: its tokens
        and the variant's max_new_tokens exceed the model's context. The default, for an engine
        that does not know its context: nothing is checked."""

    def close(self) -> None:
        """Release what the engine holds outside this process's memory (vLLM's engine-core
        process, the openai engine's connection pool). Every owner of an engine calls it when it
        is done with the engine. The default: nothing is held, nothing is done."""

    def adapter_note(self, path: str) -> str | None:
        """Check the LoRA adapter at `path` against this engine's model now, before any sampling:
        raise InputError for one that cannot apply (another architecture or tokenizer), and return
        the warning a run should record for one trained on another checkpoint, else None.

        The default checks nothing and returns None: such an engine meets the adapter when a
        variant first uses it (vLLM loads served or requested adapters itself)."""
        return None

    def base_facts(self) -> dict | None:
        """What a LoRA adapter trained on this engine's model must agree with: hashes of the
        architecture, tokenizer, chat template and a fingerprint of the weights
        (`tailmon.engines.transformers_engine.base_model_facts`), as adapter metadata records them.
        The default, for an engine that cannot read its model's weights: None."""
        return None


def score_need(need, n: int, m: int) -> np.ndarray:
    """`Engine.score_many`'s `need` as an (n, m) bool array (all True for None); InputError for another shape."""
    if need is None:
        return np.ones((n, m), dtype=bool)
    need = np.asarray(need, dtype=bool)
    if need.shape != (n, m):
        raise InputError(f"need has shape {need.shape}, expected ({n}, {m}) (responses x variants)")
    return need


# -- checkpoints ------------------------------------------------------------------------------
# A forward pass cannot be interrupted inside its thread. Between passes, engines (after every
# batch) and the estimation pipeline (between prompts and phases) call `checkpoint()`; whoever
# runs the work (the daemon) installs a hook with `checkpoints(hook)` that records the progress
# (its systemd watchdog pings only while there is some) and may raise to stop the work there
# (the daemon's stop, a run's time limit). Without a hook every call is a no-op. The hook is per
# thread (a ContextVar): a run's hook never fires for work in another thread.


class CheckpointHook(Protocol):
    def checkpoint(self) -> None:
        """Called between units of work; may raise to stop the work here."""

    def unbatched(self, entering: bool) -> None:
        """Called when a step that has no batches to report (loading a model) begins (True) and
        ends (False): it is not a stall however long it takes."""


_HOOK: ContextVar[CheckpointHook | None] = ContextVar("tailmon_checkpoint_hook", default=None)


def checkpoint() -> None:
    """A point between units of work where the work may be stopped (see above)."""
    hook = _HOOK.get()
    if hook is not None:
        hook.checkpoint()


@contextlib.contextmanager
def checkpoints(hook: CheckpointHook) -> Iterator[None]:
    """Install `hook` for the work done in this thread inside the block."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


@contextlib.contextmanager
def unbatched_step() -> Iterator[None]:
    """Wrap a long step without batches (loading a checkpoint). No checkpoint follows it: what
    it built (a loaded model) would be thrown away by a stop there; the next batch is one."""
    hook = _HOOK.get()
    if hook is None:
        yield
        return
    hook.unbatched(True)
    try:
        yield
    finally:
        hook.unbatched(False)
