"""The in-process transformers (+ peft) engine: the embedded default, on CPU or GPU.

Sampling is tailmon's own loop over a KV cache rather than `model.generate`, so that nothing of
the model's generation_config (top_k=50, repetition penalties, ...) can slip into the
distribution, and the log-prob of every drawn token is the one it was drawn from. Each token is
drawn by inverse CDF with a uniform taken from its response's own row of uniforms (`_uniforms`),
so that `sample_mixture` can decode a whole mixture's components in one batch and still draw, for
each component, what `sample` draws with the same seed.
A steered variant (`Variant.steering`, see `tailmon.engines.steering`) runs each of its forward
passes, sampling and scoring alike, with hooks on the decoder layers that exist only for that pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from tailmon.engines.adapters import adapter_compatibility, read_adapter_metadata
from tailmon.engines.base import Decoding, Samples, Steering, Tilt, Variant, checkpoint, score_need
from tailmon.engines.chat import ChatEngine, context_length
from tailmon.engines.loading import EngineSettings
from tailmon.engines.models import DEFAULT_MODEL, resolve
from tailmon.engines.processing import processed_logprobs, tilted_logprobs
from tailmon.engines.steering import DirectionFile, decoder_layers, load_direction, steering_hooks
from tailmon.engines.tilt import load_tilt
from tailmon.errors import InputError, RuntimeFailure


# Rows x positions x vocabulary of float32 logits held at once while scoring; 1024 positions of
# a 49k vocabulary is 200 MB per tensor, a few of which live at the same time.
SCORE_TOKEN_BUDGET = 1024
# Positions a scoring chunk holds before it may end early to avoid padding (see `_chunks`).
SCORE_MIN_CHUNK = 256

log = logging.getLogger(__name__)

# Values sampled from each weight tensor for the checkpoint fingerprint.
_FINGERPRINT_VALUES = 64


def _base_parameters(model):
    """(name, tensor) of the model's own weights, named as in the plain transformers model: peft
    prefixes and `.base_layer` removed, LoRA parameters skipped, so the same checkpoint gives the
    same names whether or not adapters were loaded into it."""
    for name, param in model.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        if name.startswith("base_model.model."):
            name = name[len("base_model.model."):]
        yield name.replace(".base_layer.", ".").replace(".original_module.", "."), param


def base_model_facts(model, tokenizer) -> dict:
    """What an adapter trained on this model must agree with, as hashes and a readable summary.

    architecture_sha256: model type and every weight's name and shape (what a LoRA adapter attaches
    to); tokenizer_sha256: the vocabulary and special tokens (what token ids mean);
    chat_template_sha256: how prompts are rendered; weights_fingerprint: a sample of the weights
    themselves (64 evenly spaced values of each tensor, rounded to bfloat16 so that a bf16 copy of
    the same checkpoint matches), which tells one checkpoint from another without reading them all.
    """
    arch = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    weights = hashlib.sha256()
    for name, param in sorted(_base_parameters(model), key=lambda x: x[0]):
        arch.update(f"{name}:{tuple(param.shape)};".encode())
        flat = param.detach().reshape(-1)
        k = min(flat.numel(), _FINGERPRINT_VALUES)
        # integer arithmetic: a float32 linspace cannot index the end of a 28M-element embedding
        idx = torch.arange(k, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)
        sample = flat[idx.to(flat.device)].to(torch.bfloat16).float().cpu().numpy()
        weights.update(name.encode())
        weights.update(sample.tobytes())
    specials = {k: getattr(tokenizer, k, None) for k in ("eos_token", "bos_token", "pad_token", "unk_token")}
    tok = hashlib.sha256(json.dumps([sorted(tokenizer.get_vocab().items()), specials], default=str).encode())
    template = hashlib.sha256((getattr(tokenizer, "chat_template", None) or "").encode())
    config = model.config
    return {
        "architecture_sha256": arch.hexdigest(),
        "tokenizer_sha256": tok.hexdigest(),
        "chat_template_sha256": template.hexdigest(),
        "weights_fingerprint": weights.hexdigest(),
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": len(tokenizer.get_vocab()),
    }


def _uniforms(seed: int, n: int, steps: int) -> torch.Tensor:
    """The random numbers of n responses drawn with `seed`: (n, steps) float64 uniforms in [0, 1),
    drawn up front by a CPU generator (the same on every device); u[i, t] draws token t of
    response i (`_pick`). A response's randomness thus depends on the seed, its row and its step
    only, never on the batch it is decoded in (other components' rows, the batch size): the
    per-component and the batched mixture paths draw the same tokens, runs replay, and equal
    seeds give common random numbers (`tailmon check` pairs candidate and baseline draws so)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand((n, steps), generator=generator, dtype=torch.float64)


def _pick(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: per row of log-probs `logp` (b, V), the token whose interval of the
    cumulative distribution (float64, vocabulary order) holds u * total, u (b,). The chosen i has
    cdf[i] > x >= cdf[i-1], so p_i > 0: never a token that truncation removed; x stays below the
    total, so i < V."""
    cdf = logp.double().exp().cumsum(dim=1)
    total = cdf[:, -1:]
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1)


def _samples(token_ids: list[list[int]], token_lps: list[np.ndarray], finished: list[bool]) -> Samples:
    return Samples(token_ids=token_ids, logprobs=np.array([lp.sum() for lp in token_lps], dtype=np.float64),
                   finished=finished, token_logprobs=token_lps)


def _adapter_stamp(path: str) -> tuple:
    """(inode, size, mtime in ns) of each file of a peft adapter folder: which files it holds now.
    Cheap (a stat per file, an adapter's weights may be large); a folder deleted and written again
    gets new inodes even within the file system's timestamp granularity."""
    folder = Path(path)
    try:
        files = sorted(f for f in folder.iterdir() if f.name.startswith("adapter_"))
        return tuple((f.name, f.stat().st_ino, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except OSError:
        return ()


def _content_key(path: str, missing: str) -> tuple[str, str]:
    """(resolved path, sha256 of the content) of a small file a variant names (a steering direction,
    a token tilt), InputError `missing` when it cannot be read. Keyed by content, not by mtime: a
    file rewritten within the file system's timestamp granularity (same mtime, same size) would
    keep its stale value. Such files are small; hashing them costs nothing next to a forward pass."""
    try:
        content = Path(path).read_bytes()
    except OSError:
        raise InputError(missing) from None
    return str(Path(path).resolve()), hashlib.sha256(content).hexdigest()


class _Steer(NamedTuple):
    """A variant's steering resolved against the model: the arguments of `steering_hooks`."""

    layers: torch.nn.ModuleList
    indices: tuple[int, ...]
    kind: str
    coef: float
    vector: torch.Tensor


class _Return(NamedTuple):
    """Where a row of a batched mixture returns to the target (`Variant.returns_after`): after
    its first `k` tokens it goes on under the continuation's rendered prompt, adapter (peft's
    name; None when the batch sets one set of weights for every row), decoding and tilt.
    `same_context`: the head renders the continuation's prompt under the continuation's weights
    (it differs only in decoding or tilt), so its rows' KV cache is already the continuation's."""

    k: int
    prompt: list[int]
    adapter: str | None
    decoding: Decoding
    tilt: Tilt | None
    same_context: bool = False


class TransformersEngine(ChatEngine):
    name = "transformers"
    returns_to_target = True
    tilts = True

    def __init__(self, model, tokenizer, *, model_id: str = "model", batch_size: int = 64,
                 batched_mixture: bool = True, shared_scoring: bool = True, batched_scoring: bool = True):
        self.model = model.eval()
        self.batch_size = batch_size
        self.batched_mixture = batched_mixture
        """`sample_mixture` decodes the components that can share a batch together (True) or
        calls `sample` once per component (False: the path before, kept for comparison)."""
        self.batched_return = True
        """With `batched_mixture`: a component that returns to the target decodes inside the
        mixture's batch, its rows switching in place to the target after their first K tokens
        (True), or is drawn by `sample` on its own (False: the path before, kept for comparison)."""
        self._switchable: bool | None = None  # whether the model's KV cache can switch rows in place
        self.shared_scoring = shared_scoring
        """`score_many` shares one forward pass between the variants that differ only in decoding
        or tilt (True) or calls `score` once per variant (False: the path before, kept for
        comparison; the same values to float32 round-off)."""
        self.batched_scoring = batched_scoring
        """With `shared_scoring`: `score_many` runs the passes of different prompts and adapters
        together, rows of several passes in one batch, each distinct (prompt, adapter) prefilled
        once (True), or each pass on its own (False: the path before, kept for comparison; the
        same values to float32 round-off)."""
        self._adapters: dict[str, str] = {}  # adapter path -> peft adapter name
        self._adapter_stamps: dict[str, tuple] = {}  # adapter path -> `_adapter_stamp` when loaded
        self._adapter_notes: dict[str, str | None] = {}  # adapter path -> its compatibility warning
        self._facts: dict | None = None
        # (resolved path, content hash) -> direction file: loaded once, again only when rewritten
        self._directions: dict[tuple, DirectionFile] = {}
        self._steer_vectors: dict[tuple, torch.Tensor] = {}  # (file key, kind, dtype, device) -> vector
        self._tilts: dict[tuple, torch.Tensor] = {}  # (resolved path, content hash, scale) -> dense float32 bias
        stops = set()
        for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if source is None:
                continue
            stops.update(source if isinstance(source, (list, tuple)) else [source])
        self._init_chat(tokenizer, model_id, stops, context_length(model.config))
        self._stop_tensor = torch.tensor(sorted(self._stops))
        # transformers 5.2x renamed `past_key_values` to `cache`; support both spellings.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None

    @classmethod
    def load(cls, ref: str | None = None, *, device: str = "cpu", dtype: str = "float32", batch_size: int = 64,
             batched_mixture: bool = True, shared_scoring: bool = True, batched_scoring: bool = True):
        """Load a model reference (embedded name, local folder or hub id)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve(ref)
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise InputError(f"unknown dtype '{dtype}'")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
        except Exception as exc:  # any failure inside transformers while loading is the model's
            raise RuntimeFailure(f"model '{ref or DEFAULT_MODEL}' failed to load from {path}: {exc}") from exc
        return cls(model, tokenizer, model_id=str(ref or DEFAULT_MODEL), batch_size=batch_size,
                   batched_mixture=batched_mixture, shared_scoring=shared_scoring,
                   batched_scoring=batched_scoring)

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> "TransformersEngine":
        """The engine `settings` describe: its loader in `tailmon.engines.loading.ENGINES`."""
        return cls.load(settings.ref, device=settings.device, dtype=settings.dtype, batch_size=settings.batch_size,
                        batched_mixture=settings.batched_mixture, shared_scoring=settings.shared_scoring,
                        batched_scoring=settings.batched_scoring)

    # -- facts -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- variants ----------------------------------------------------------------------------

    def base_facts(self) -> dict:
        """`base_model_facts` of this engine's checkpoint (computed once: the weights never change)."""
        if self._facts is None:
            self._facts = base_model_facts(self.model, self.tokenizer)
        return self._facts

    def adapter_note(self, path: str) -> str | None:
        """Load a LoRA adapter now (refusing one trained on another architecture or tokenizer) and
        return its warning when it was trained on another checkpoint, for the run to record."""
        self._adapter_name(path)
        return self._adapter_notes.get(path)

    def _adapter_name(self, path: str) -> str:
        # Keyed by the files too, not by the path alone: an adaptive monitor whose update was not
        # adopted writes its next candidate into the same folder, and a path-keyed cache would go on
        # serving the deleted candidate's weights under the new one's name and checksum.
        stamp = _adapter_stamp(path)
        if path in self._adapters and self._adapter_stamps.get(path) != stamp:
            old = self._adapters.pop(path)
            self._adapter_notes.pop(path, None)
            try:
                self.model.delete_adapter(old)  # rewritten on disk: load it again below
            except (ValueError, KeyError, AttributeError):  # peft keeps it: only memory is lost
                pass
        if path not in self._adapters:
            from peft import PeftModel

            name = "a" + hashlib.sha1(f"{Path(path).resolve()}|{stamp}".encode()).hexdigest()[:12]
            if not (Path(path) / "adapter_config.json").is_file():
                raise InputError(f"LoRA adapter '{path}' has no adapter_config.json")
            meta = read_adapter_metadata(path)
            # Checked before peft touches the model: an adapter for another tokenizer may load
            # without complaint and still mean nothing.
            note = adapter_compatibility(meta, self.base_facts(), path, self._model_id) if meta else None
            if note:
                log.warning("%s", note)
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(path, adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise InputError(f"LoRA adapter '{path}' does not fit model {self._model_id}: {exc}") from exc
            self._adapters[path] = name
            self._adapter_stamps[path] = stamp
            self._adapter_notes[path] = note
        return self._adapters[path]

    @contextlib.contextmanager
    def _variant_weights(self, variant: Variant):
        """Switch the LoRA adapters on or off for one variant, without reloading anything."""
        from peft.tuners.lora import LoraLayer

        if variant.adapter is None:
            if self._adapters:
                with self.model.disable_adapter():
                    yield
            else:
                yield
            return
        name = self._adapter_name(variant.adapter)
        self.model.set_adapter(name)
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale(name, variant.adapter_scale)
        yield

    def _steering(self, steering: Steering | None) -> _Steer | None:
        """Check a variant's steering against this model and resolve it, before any forward pass."""
        if steering is None:
            return None
        key = _content_key(steering.path, f"steering direction file '{steering.path}' does not exist "
                                          "(make one with `tailmon proposals steer`)")
        if key not in self._directions:
            file = load_direction(steering.path)
            for old in [k for k in self._directions if k[0] == key[0]]:  # the file was rewritten
                del self._directions[old]
                for v in [v for v in self._steer_vectors if v[0] == old]:
                    del self._steer_vectors[v]
            self._directions[key] = file
        file = self._directions[key]
        layers = decoder_layers(self.model)
        hidden = int(self.model.config.hidden_size)
        if file.hidden_size != hidden:
            raise InputError(f"steering direction '{steering.path}' has {file.hidden_size} dimensions, "
                             f"model {self._model_id} has hidden size {hidden}")
        if file.num_layers != len(layers):
            raise InputError(f"steering direction '{steering.path}' was computed on a model with {file.num_layers} "
                             f"layers, model {self._model_id} has {len(layers)}")
        indices = steering.layers if steering.layers is not None else (file.layer,)
        bad = [i for i in indices if not 0 <= i < len(layers)]
        if bad:
            raise InputError(f"steering layer {bad[0]} is out of range: model {self._model_id} has layers 0..{len(layers) - 1}")
        param = next(self.model.parameters())
        vkey = (key, steering.kind, param.dtype, param.device)
        if vkey not in self._steer_vectors:
            v = file.direction  # float32: normalise before any cast to a low-precision dtype
            if steering.kind == "ablate":
                norm = float(v.norm())
                if not norm > 0:
                    raise InputError(f"steering direction '{steering.path}' is zero at layer {file.layer}: nothing to ablate")
                v = v / norm
            self._steer_vectors[vkey] = v.to(device=param.device, dtype=param.dtype)
        return _Steer(layers, tuple(indices), steering.kind, steering.coef, self._steer_vectors[vkey])

    def _tilt(self, tilt: Tilt | None) -> torch.Tensor | None:
        """A variant's token tilt as a dense float32 bias over the vocabulary, checked against
        this model's vocabulary and tokenizer before any forward pass; None for no tilt."""
        if tilt is None:
            return None
        key = _content_key(tilt.path, f"token tilt file '{tilt.path}' does not exist "
                                      "(fit one with `tailmon proposals fit-tilt`)") + (tilt.scale,)
        if key not in self._tilts:
            file = load_tilt(tilt.path)
            ours = self.base_facts()["tokenizer_sha256"]
            if file.tokenizer_sha256 is not None and file.tokenizer_sha256 != ours:
                # token ids of another tokenizer mean other tokens: the tilt would bias the wrong ones
                raise InputError(f"token tilt '{tilt.path}' was fitted with another tokenizer than model "
                                 f"{self._model_id}'s")
            dense = torch.from_numpy(file.dense(self.vocab_size) * tilt.scale).float()
            for old in [k for k in self._tilts if k[0] == key[0]]:
                del self._tilts[old]
            self._tilts[key] = dense
        return self._tilts[key]

    # -- primitives --------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, prompt: str, variant: Variant, n: int, seed: int) -> Samples:
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        u = _uniforms(seed, n, variant.decoding.max_new_tokens)
        head = variant.head  # the variant itself unless it returns to the target
        k = head.decoding.max_new_tokens
        token_ids, token_lps, finished = self._sample_parts(prompt, [(head, u[:, :k])], self._steering(head.steering))
        if variant.returns:
            self._continue_from_target(prompt, variant, token_ids, token_lps, finished, u)
        return _samples(token_ids, token_lps, finished)

    @torch.inference_mode()
    def sample_mixture(self, prompt: str, variants: Sequence[Variant], counts: Sequence[int],
                       seeds: Sequence[int]) -> list[Samples]:
        """The draws of a mixture in one decode loop: the rows of every component that can share a
        batch (`_joins_batch`) are decoded together, each with its own prompt (each distinct
        prompt and adapter prefilled once, then left-padded rows with an attention mask and their
        own positions), its own adapter (peft's per-row `adapter_names`) and its own decoding, so
        that every step's fixed cost is paid once rather than once per component. A component
        that returns to the target decodes its head in the batch too: after K tokens its rows
        switch in place to the target (`_switch_to_target`: their KV rows recomputed from the
        target's own rendered prompt and the K tokens, never from the head's cache). A steered
        component's hooks edit its own rows only, its prompt prefilled under its steering. The
        others (a second scale of one adapter, a steered component that returns to the target,
        adapters peft cannot mix per row) go through `sample`.

        Each row draws with its component's uniforms (`_uniforms`), so that a component's tokens
        are those `sample` draws with the same seed, except where a uniform falls within the
        float32 round-off of another batch shape of the edge of its token's interval: never in the
        tiny-model tests, 1 token of 192 on the embedded 135M model (in the low-probability tail,
        whose intervals are narrower than the round-off); the response then goes on differently,
        from the same distribution. `batched_mixture=False`: `sample` once per component."""
        if not (len(variants) == len(counts) == len(seeds)):
            raise InputError(f"sample_mixture: {len(variants)} variants, {len(counts)} counts and {len(seeds)} seeds")
        for n in counts:
            if n < 1:
                raise InputError(f"n must be >= 1, got {n}")
        scales: dict[str, float] = {}
        joined = [j for j, v in enumerate(variants)
                  if self.batched_mixture and self._joins_batch(v, scales, steered=True)]
        if len(joined) < 2:
            joined = []  # one component alone: `sample` is the same decode
        out: list[Samples | None] = [None] * len(variants)
        if joined:
            t0 = time.perf_counter()
            parts = [(variants[j], _uniforms(seeds[j], counts[j], variants[j].decoding.max_new_tokens)) for j in joined]
            token_ids, token_lps, finished = self._sample_parts(prompt, parts)
            seconds = (time.perf_counter() - t0) / len(token_ids)  # per row: the decode's time split by rows
            start = 0
            for j in joined:
                end = start + counts[j]
                out[j] = _samples(token_ids[start:end], token_lps[start:end], finished[start:end])
                out[j].seconds = seconds * counts[j]
                start = end
        for j, (variant, n, seed) in enumerate(zip(variants, counts, seeds)):
            if out[j] is None:
                t0 = time.perf_counter()
                out[j] = self.sample(prompt, variant, n, seed)
                out[j].seconds = time.perf_counter() - t0
        return out

    def _joins_batch(self, variant: Variant, scales: dict[str, float], steered: bool = False) -> bool:
        """Whether `variant`'s rows can share a mixed batch exactly. Not: an adapter that peft
        cannot mix per row (DoRA and other LoRA variants, modules_to_save), an adapter already in
        the batch at another scale (peft keeps one scale per adapter), or steering unless
        `steered` (the sampling batch edits the steered rows only, `steering_hooks`' `rows`;
        scoring's shared passes do not). A component that returns to the target joins when its
        head and its continuation both do unsteered and the model's KV cache can switch rows in
        place (`_switchable_cache`). `scales`: adapter path -> the scale the batch uses, filled as
        variants join."""
        if variant.returns and variant.returns_after < variant.decoding.max_new_tokens:
            if not (self.batched_return and self._switchable_cache()):
                return False
            trial = dict(scales)  # a variant that does not join leaves no scale behind
            if self._joins_batch(variant.head, trial) and self._joins_batch(variant.continuation, trial):
                scales.update(trial)
                return True
            return False
        variant = variant.head  # K >= max_new_tokens: the head draws every token
        if variant.steering is not None and not steered:
            return False
        if variant.adapter is None:
            return True
        if not self._mixable(self._adapter_name(variant.adapter)):
            return False
        return scales.setdefault(variant.adapter, variant.adapter_scale) == variant.adapter_scale

    def _switchable_cache(self) -> bool:
        """Whether the model's KV cache is transformers' DynamicCache of plain full-attention
        layers (keys and values (b, heads, positions, dim) per layer), whose rows
        `_switch_to_target` can rewrite in place; a sliding-window or other cache cannot, and a
        returning component is then drawn on its own. Checked once, from the model's config."""
        if self._switchable is None:
            try:
                from transformers.cache_utils import DynamicCache, DynamicLayer

                layers = DynamicCache(config=self.model.config).layers
                self._switchable = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
            except (ImportError, AttributeError, TypeError, ValueError, KeyError):
                self._switchable = False
        return self._switchable

    def _mixable(self, name: str) -> bool:
        """Whether peft runs adapter `name` on a subset of a batch's rows (`adapter_names`) as it
        runs it on a whole batch: plain LoRA only."""
        from peft.tuners.lora import LoraLayer

        config = self.model.peft_config[name]
        if getattr(config, "modules_to_save", None):
            return False
        return not any(name in getattr(m, "lora_variant", {}) for m in self.model.modules() if isinstance(m, LoraLayer))

    @contextlib.contextmanager
    def _mixed_weights(self, variants: Sequence[Variant]):
        """The weights of a batch whose rows belong to several variants: yields each variant's peft
        adapter name ('__base__' for the base weights), to pass as `adapter_names`, or None when
        no variant has an adapter (then loaded adapters are off for the whole batch)."""
        from peft.tuners.lora import LoraLayer

        if all(v.adapter is None for v in variants):
            with self._variant_weights(variants[0]):
                yield None
            return
        names = []
        for v in variants:
            if v.adapter is None:
                names.append("__base__")
                continue
            name = self._adapter_name(v.adapter)
            for module in self.model.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale(name, v.adapter_scale)
            names.append(name)
        yield names

    def _sample_parts(self, prompt: str, parts: Sequence[tuple[Variant, torch.Tensor]], steer: _Steer | None = None):
        """Draw the rows of `parts` ((variant, its (n, steps) uniforms)), in order, in batches of
        batch_size rows that may hold rows of several parts: token id lists, per-token log-prob
        arrays, finished flags. A variant draws every token itself, or returns to the target after
        K < max_new_tokens tokens (its rows switch in the batch, `_switch_to_target`; steer is
        then None). `steer` applies to every row (one part only); otherwise each part's own
        steering edits its rows only (`steering_hooks`' `rows`)."""
        variants = [v for v, _ in parts]
        prompts = [self.rendered(prompt, v) for v in variants]
        # (the variant's Steering, a hashable key, and its resolved hooks' arguments) per part
        own = [None if steer is not None or v.head.steering is None
               else (v.head.steering, self._steering(v.head.steering)) for v in variants]
        back = [v.continuation if v.returns and v.returns_after < v.decoding.max_new_tokens else None
                for v in variants]
        conts = list(dict.fromkeys(c for c in back if c is not None))
        if conts and steer is not None:
            raise ValueError("a steered batch cannot return to the target")  # sample() never asks
        cont_prompts = [self.rendered(prompt, c) for c in conts]
        rows = [(p, i) for p, (_, u) in enumerate(parts) for i in range(u.shape[0])]
        width = max(u.shape[1] for _, u in parts)
        token_ids: list[list[int]] = []
        token_lps: list[np.ndarray] = []
        finished: list[bool] = []
        # the continuations' weights are set up with the heads': their rows switch adapter mid-decode
        weights = (self._variant_weights(variants[0]) if len(parts) == 1 and not conts
                   else self._mixed_weights(variants + conts))
        prefills: dict[tuple, list] = {}  # the continuations' prompt caches, shared by every batch
        with weights as names:
            returns = [None if c is None else
                       _Return(v.returns_after, cont_prompts[conts.index(c)],
                               None if names is None else names[len(variants) + conts.index(c)], c.decoding, c.tilt,
                               same_context=(prompts[p] == cont_prompts[conts.index(c)] and v.adapter == c.adapter
                                             and (v.adapter is None or v.adapter_scale == c.adapter_scale)))
                       for p, (v, c) in enumerate(zip(variants, back))]
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                u = torch.zeros((len(chunk), width), dtype=torch.float64)
                for r, (p, i) in enumerate(chunk):
                    u[r, : parts[p][1].shape[1]] = parts[p][1][i]
                toks, lps, done = self._sample_batch(
                    [prompts[p] for p, _ in chunk], None if names is None else [names[p] for p, _ in chunk],
                    [variants[p].decoding for p, _ in chunk], u, steer, [variants[p].tilt for p, _ in chunk],
                    returns=[returns[p] for p, _ in chunk] if conts else None, prefills=prefills,
                    row_steers=[own[p] for p, _ in chunk] if any(own) else None)
                token_ids += toks
                token_lps += lps
                finished += done
                checkpoint()
        return token_ids, token_lps, finished

    def _continue_from_target(self, prompt: str, variant: Variant, token_ids: list[list[int]],
                              token_lps: list[np.ndarray], finished: list[bool], uniforms: torch.Tensor) -> None:
        """Draw the rest of every response the head of a returning variant left open, from its
        continuation (the target), in place, with the columns after K of each row's uniforms.

        A fresh prefill of the prompt as the *continuation* renders it (its system prompt), then
        the K drawn tokens, under the continuation's weights and steering: nothing computed under
        the head's system prompt, adapter or steering enters the target's cache, so the tokens
        after K follow p(. | x, y_1..K) exactly. Every open response has exactly K tokens (fewer
        means a stop token ended it), so the rows need no padding.
        """
        target = variant.continuation
        k = variant.head.decoding.max_new_tokens
        steps = variant.decoding.max_new_tokens - k
        open_rows = [i for i, (r, done) in enumerate(zip(token_ids, finished)) if not done and len(r) == k]
        if steps <= 0 or not open_rows:
            return
        ids = self.rendered(prompt, target)
        steer = self._steering(target.steering)
        with self._variant_weights(target):
            for start in range(0, len(open_rows), self.batch_size):
                rows = open_rows[start:start + self.batch_size]
                logits, cache = self._forward(torch.tensor([ids]), last_only=True, steer=steer)
                cache.batch_repeat_interleave(len(rows))
                logits, cache = self._forward(torch.tensor([token_ids[i] for i in rows]), cache, last_only=True,
                                              steer=steer)
                toks, lps, done = self._decode(logits[:, -1, :], cache, [target.decoding] * len(rows),
                                               uniforms[rows, k:], steer)
                for i, t, lp, d in zip(rows, toks, lps, done):
                    token_ids[i] = token_ids[i] + t
                    token_lps[i] = np.concatenate([token_lps[i], lp])
                    finished[i] = d
                checkpoint()

    def _forward(self, input_ids: torch.Tensor, cache=None, last_only: bool = False, steer: _Steer | None = None,
                 mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                 adapters: list[str] | None = None):
        """One forward pass with a KV cache: (logits, cache). A steered pass edits the residual
        stream of every row and position, the prompt's included (its keys and values enter the
        cache already steered), so that sampling (prefill, then one token at a time) and scoring
        (prefill, then the whole response) run the same steered model. `mask` (b, cached + new
        positions) and `positions` (b, new): left-padded rows (`_sample_batch`); `adapters`: peft's
        adapter name per row; `steer` a list of (steering, bool mask over the rows): a batch of
        several components, each steering editing its own rows only."""
        kwargs = {"use_cache": True}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if last_only and self._keep_kw:
            kwargs[self._keep_kw] = 1
        if mask is not None:
            kwargs["attention_mask"] = mask.to(self.device)
            kwargs["position_ids"] = positions.to(self.device)
        if adapters is not None:
            kwargs["adapter_names"] = adapters
        if isinstance(steer, list):  # a mixed batch: each steering edits its own rows
            hooks = contextlib.ExitStack()
            for s, rows in steer:
                hooks.enter_context(steering_hooks(*s, rows=rows))
        else:
            hooks = steering_hooks(*steer) if steer is not None else contextlib.nullcontext()
        with hooks:
            out = self.model(input_ids=input_ids.to(self.device), **kwargs)
        new_cache = getattr(out, "cache", None)
        return out.logits, (getattr(out, "past_key_values", None) if new_cache is None else new_cache)

    def _sample_batch(self, prompts: list[list[int]], adapters: list[str] | None, decodings: list[Decoding],
                      u: torch.Tensor, steer: _Steer | None = None, tilts: list[Tilt | None] | None = None,
                      returns: list[_Return | None] | None = None, prefills: dict | None = None,
                      row_steers: list[tuple[Steering, _Steer] | None] | None = None):
        """Decode one batch: row i continues prompts[i] under adapter adapters[i] (None: the
        weights already set) with decodings[i], drawing token t with u[i, t]; a row with
        returns[i] switches to the target after its first returns[i].k tokens (`_decode`).
        `prefills`: the continuations' one-row prompt caches, (prompt, adapter) -> [(keys,
        values) per layer], filled here from this batch's prefill when it holds one.
        `row_steers`: row i's steering (its Steering and resolved `_Steer`) or None; a steered
        row's prompt is prefilled under its steering, and every pass edits its rows only.

        Each distinct (prompt, adapter) is prefilled once and its KV cache copied to its rows. Rows
        of different prompt lengths are left-padded: the padding is masked out of every attention
        and each row's positions count its own tokens only, so a row computes what it computes
        alone, up to float32 round-off (tests/engines/test_eng_mixture.py)."""
        steers = row_steers or [None] * len(prompts)
        keys = [(tuple(p), None if adapters is None else adapters[i], None if steers[i] is None else steers[i][0])
                for i, p in enumerate(prompts)]
        distinct = list(dict.fromkeys(keys))
        lengths = [len(ids) for ids, *_ in distinct]
        width = max(lengths)
        names = None if adapters is None else [a for _, a, _ in distinct]
        if row_steers is not None:  # the prefill's rows are the distinct keys; the decode's, the batch's
            resolved = {k[0]: k[1] for k in steers if k is not None}
            steer = self._rows_steered(resolved, [k for *_, k in distinct])
            decode_steer = self._rows_steered(resolved, [None if k is None else k[0] for k in steers])
        else:
            decode_steer = steer
        mask = positions = None
        if len(set(lengths)) == 1:
            logits, cache = self._forward(torch.tensor([list(ids) for ids, *_ in distinct]), last_only=True,
                                          steer=steer, adapters=names)
        else:
            x = torch.full((len(distinct), width), self._pad, dtype=torch.long)
            mask = torch.zeros((len(distinct), width), dtype=torch.long)
            for g, (ids, *_) in enumerate(distinct):
                x[g, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[g, width - len(ids):] = 1
            prefill_positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits, cache = self._forward(x, last_only=True, steer=steer, mask=mask, positions=prefill_positions,
                                          adapters=names)
        b = len(prompts)
        if returns is not None:
            # A continuation's prompt prefilled here (the target's rows beside the heads') is reused
            # for the switch: its real positions, without the left padding.
            for key in {(tuple(r.prompt), r.adapter) for r in returns if r is not None}:
                if (*key, None) in distinct and key not in prefills:
                    g = distinct.index((*key, None))
                    prefills[key] = [(layer.keys[g:g + 1, :, width - len(key[0]):].clone(),
                                      layer.values[g:g + 1, :, width - len(key[0]):].clone())
                                     for layer in cache.layers]
        if len(distinct) == 1:
            # Every row continues the same prompt: prefill once and copy the cache.
            cache.batch_repeat_interleave(b)
            logits = logits[:, -1, :].expand(b, -1)
        else:
            group = torch.tensor([distinct.index(k) for k in keys], dtype=torch.long)
            cache.reorder_cache(group.to(self.device))
            logits = logits[group.to(logits.device), -1, :]
            if mask is not None:
                mask = mask[group]
                positions = torch.tensor(lengths, dtype=torch.long)[group]
        return self._decode(logits, cache, decodings, u, decode_steer, mask=mask, start=positions, adapters=adapters,
                            tilts=tilts, returns=returns, prefills=prefills)

    def _rows_steered(self, resolved: dict, per_row: list) -> list[tuple[_Steer, torch.Tensor]]:
        """Each steering of a mixed batch with the mask of its rows (`per_row`: each row's
        Steering or None), as `_forward` takes them; the mask on the model's device, made once
        per batch rather than moved at every hooked layer of every step."""
        return [(s, torch.tensor([k == key for k in per_row], device=self.device)) for key, s in resolved.items()]

    def _decode(self, logits: torch.Tensor, cache, decodings: list[Decoding], u: torch.Tensor,
                steer: _Steer | None = None, mask: torch.Tensor | None = None, start: torch.Tensor | None = None,
                adapters: list[str] | None = None, tilts: list[Tilt | None] | None = None,
                returns: list[_Return | None] | None = None, prefills: dict | None = None):
        """Draw tokens from `logits` (b, V) on, row i with decodings[i] (and token tilt tilts[i])
        until a stop token or min(decodings[i].max_new_tokens, u.shape[1]) tokens, token t with
        uniform u[i, t]: (token id lists, per-token processed log-prob arrays (float64), finished
        flags). `mask` / `start`: the left-padded rows' prompt mask and prompt lengths (`_sample_batch`).

        A row with returns[i] (K = returns[i].k) draws its first K tokens as above, then, still
        open, switches to the target (`_switch_to_target`) before its K-th token is forwarded:
        that pass computes the target's logits for token K, and the row draws tokens K.. with the
        target's decoding and tilt and the same uniform columns as `sample` does."""
        b, steps = u.shape
        tokens = torch.full((b, steps), self._pad, dtype=torch.long)
        token_lps = torch.zeros((b, steps), dtype=torch.float64)
        alive = torch.ones(b, dtype=torch.bool)
        lengths = torch.zeros(b, dtype=torch.long)
        limit = torch.tensor([d.max_new_tokens for d in decodings])
        decodings = list(decodings)
        tilts = list(tilts or [None] * b)
        adapters = None if adapters is None else list(adapters)
        # rows that switch after the same number of tokens to the same continuation switch together
        switches: dict[tuple, list[int]] = {}
        for i, r in enumerate(returns or []):
            if r is not None:
                switches.setdefault((r.k, tuple(r.prompt), r.adapter, r.same_context), []).append(i)

        def grouped():
            # Rows that process logits alike, processed together (the processing ignores the length).
            groups: dict[tuple, list[int]] = {}
            for i, d in enumerate(decodings):
                groups.setdefault((d.temperature, d.top_p, d.top_k, tilts[i]), []).append(i)
            return [(decodings[rows[0]], self._tilt(tilts[rows[0]]), torch.tensor(rows)) for rows in groups.values()]

        plan = grouped()
        for t in range(steps):
            if len(plan) == 1:
                logp = tilted_logprobs(processed_logprobs(logits, plan[0][0]), plan[0][1]).cpu()
            else:
                logp = torch.empty(logits.shape, dtype=torch.float32)
                for decoding, bias, rows in plan:
                    logp[rows] = tilted_logprobs(processed_logprobs(logits[rows.to(logits.device)], decoding), bias).cpu()
            # Sampled on the CPU from each row's own uniforms: reproducible across devices and batches.
            nxt = _pick(logp, u[:, t])
            token_lps[:, t] = torch.where(alive, logp.gather(1, nxt[:, None]).squeeze(1).double(), 0.0)
            tokens[:, t] = torch.where(alive, nxt, self._pad)
            lengths += alive
            alive &= ~torch.isin(nxt, self._stop_tensor) & (limit > t + 1)
            if not alive.any() or t + 1 == steps:
                break
            switched = False
            for (k, _, _, _), rows in switches.items():
                if k != t + 1:
                    continue
                # rows a stop token ended before K stay ended: nothing of theirs is computed again
                rows = [i for i in rows if alive[i]]
                if not rows:
                    continue
                r = returns[rows[0]]
                # A head that differs from the target only in decoding or tilt computed the
                # target's own KV rows: only the processing switches. Otherwise the rows' cache,
                # mask and positions become the target's.
                if not r.same_context:
                    if mask is None:  # rows of one prompt length so far: the switched rows need a mask
                        width = cache.get_seq_length()
                        mask = torch.ones((b, width), dtype=torch.long)
                        start = torch.full((b,), width - t, dtype=torch.long)
                    mask = self._switch_to_target(cache, mask, rows, r, tokens[rows, : k - 1], prefills)
                    start[rows] = len(r.prompt)
                for i in rows:
                    decodings[i] = replace(r.decoding, max_new_tokens=decodings[i].max_new_tokens)
                    tilts[i] = r.tilt
                    if adapters is not None:
                        adapters[i] = r.adapter
                switched = True
            if switched:
                plan = grouped()
            positions = None
            if mask is not None:
                mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype)], dim=1)
                positions = (start + t)[:, None]
            logits, cache = self._forward(nxt[:, None], cache, steer=steer, mask=mask, positions=positions,
                                          adapters=adapters)
            logits = logits[:, -1, :]
        rows = [tokens[i, : lengths[i]].tolist() for i in range(b)]
        lps = [token_lps[i, : lengths[i]].numpy().copy() for i in range(b)]
        done = [bool(r and r[-1] in self._stops) for r in rows]
        return rows, lps, done

    def _switch_to_target(self, cache, mask: torch.Tensor, rows: list[int], target: _Return,
                          head: torch.Tensor, prefills: dict) -> torch.Tensor:
        """Replace, in place, the KV rows `rows` of a batch's cache (DynamicCache, every row
        `cache.get_seq_length()` positions, left-padded under `mask` (b, positions)) by the
        target's: its rendered prompt, prefilled once under its weights (or taken from
        `prefills`, which keeps it for the next batches), then the rows' first K - 1 tokens
        `head` (len(rows), K - 1) in one pass, right-aligned in the cache with the positions
        before them masked out. Nothing computed under the head's prompt, adapter or tilt stays
        in those rows. Their K-th token is the caller's next forward, which so gives the
        target's logits for token K, as `_continue_from_target` computes them for `sample`.
        The cache is widened on the left (masked positions) when the target's prompt and K - 1
        tokens do not fit. Returns the new mask."""
        from transformers.cache_utils import DynamicCache

        key = (tuple(target.prompt), target.adapter)
        names = None if target.adapter is None else [target.adapter]
        if key not in prefills:
            _, one = self._forward(torch.tensor([target.prompt]), last_only=True, adapters=names)
            prefills[key] = [(layer.keys, layer.values) for layer in one.layers]
        n = len(rows)
        small = DynamicCache([(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous())
                              for k, v in prefills[key]])
        if head.shape[1]:  # only the KV is wanted: the vocabulary projection of the last position alone
            _, small = self._forward(head, small, last_only=True, adapters=None if names is None else names * n)
        need = small.get_seq_length()
        have = cache.get_seq_length()
        if need > have:  # the target's prompt is longer than the batch's widest: pad every row on the left
            for layer in cache.layers:
                pad = layer.keys.new_zeros(layer.keys.shape[:2] + (need - have,) + layer.keys.shape[3:])
                layer.keys = torch.cat([pad, layer.keys], dim=2)
                layer.values = torch.cat([pad, layer.values], dim=2)
            mask = torch.cat([torch.zeros((mask.shape[0], need - have), dtype=mask.dtype), mask], dim=1)
            have = need
        index = torch.tensor(rows, dtype=torch.long)
        at = index.to(self.device)
        for layer, new in zip(cache.layers, small.layers):
            for old, fresh in ((layer.keys, new.keys), (layer.values, new.values)):
                old[at, :, : have - need] = 0
                old[at, :, have - need:] = fresh
        mask = mask.clone()
        mask[index] = 0
        mask[index, have - need:] = 1
        return mask

    def _prompt_then(self, prompt_ids: list[int], x: torch.Tensor, steer: _Steer | None = None):
        """Logits after the prompt, (1, V), and after each token of each row of `x` (b, width) that
        continues it, (b, width, V) (None when width is 0): one prefill of the prompt, whose KV cache
        every row shares, then one pass over the rows.

        Right padding is harmless under causal attention: a position never sees later ones.
        """
        logits, cache = self._forward(torch.tensor([prompt_ids]), last_only=True, steer=steer)
        first = logits[:, -1, :]
        if x.shape[1] == 0:
            return first, None
        cache.batch_repeat_interleave(x.shape[0])
        rest, _ = self._forward(x, cache, steer=steer)
        return first, rest

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (b, max_len) and the mask of real tokens."""
        width = max(len(s) for s in seqs)
        x = torch.full((len(seqs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
        return x, mask

    def _next_logits(self, prompt_ids: list[int], seqs: list[list[int]], steer: _Steer | None = None) -> torch.Tensor:
        """Logits after the prompt and after each token of each sequence: (b, max_len + 1, V)."""
        x, _ = self._padded(seqs)
        first, rest = self._prompt_then(prompt_ids, x, steer)
        first = first[:, None, :].expand(len(seqs), -1, -1)
        return first if rest is None else torch.cat([first, rest], dim=1)

    @staticmethod
    def _token_logprobs(first: torch.Tensor, rest: torch.Tensor | None, x: torch.Tensor, decoding: Decoding,
                        bias: torch.Tensor | None = None, which: torch.Tensor | None = None) -> torch.Tensor:
        """Processed log-prob of each token x[i, t] (b, width), float64 on the CPU, from the logits
        that predict it: first[which[i]] (`first` (p, V): the logits after each prompt; which None:
        every row continues first[0]) for t = 0, rest[i, t - 1] for t >= 1.

        `processed_logprobs` row by row, exactly as sampling computes it, but each prompt's row once
        rather than once per response, and without concatenating the two into one more
        (b, width, V) copy.
        """
        x = x.to(first.device)
        lp = tilted_logprobs(processed_logprobs(first, decoding), bias)
        head = (lp[0, x[:, 0]] if which is None else lp[which.to(lp.device), x[:, 0]])[:, None]
        if rest is None:
            return head.double().cpu()
        tail = tilted_logprobs(processed_logprobs(rest, decoding), bias).gather(2, x[:, 1:, None]).squeeze(-1)
        return torch.cat([head, tail], dim=1).double().cpu()

    def _chunks(self, seqs: list[list[int]]):
        """Consecutive slices of seqs whose padded logits fit SCORE_TOKEN_BUDGET. A slice pads its
        rows to its longest: once it holds SCORE_MIN_CHUNK positions (enough for efficient matrix
        products), a row that would make padding more than a quarter of it starts the next slice
        (`score` sorts responses by length, so that lengths that differ go to different slices)."""
        start = 0
        while start < len(seqs):
            end, width, real = start, 0, 0
            while end < len(seqs):
                n = len(seqs[end]) + 1
                w, rows = max(width, n), end - start + 1
                if end > start and rows * w > SCORE_TOKEN_BUDGET:
                    break
                if end > start and (rows - 1) * width >= SCORE_MIN_CHUNK and 4 * (rows * w - real - n) > rows * w:
                    break
                width, real, end = w, real + n, end + 1
            yield start, end
            start = end

    @torch.inference_mode()
    def score(self, prompt: str, variant: Variant, responses: Sequence[Sequence[int]]) -> np.ndarray:
        seqs = [list(map(int, r)) for r in responses]
        result = np.zeros(len(seqs), dtype=np.float64)
        if not seqs:
            return result
        vocab = self.vocab_size
        for r in seqs:
            if len(r) > variant.decoding.max_new_tokens:
                raise InputError(f"a response of {len(r)} tokens is longer than max_new_tokens={variant.decoding.max_new_tokens}")
            if any(t < 0 or t >= vocab for t in r):
                raise InputError("a response holds a token id outside the vocabulary")
        if not variant.returns:
            for rows, tok, mask in self._token_chunks(prompt, variant, seqs):
                result[rows] = torch.where(mask, tok, 0.0).sum(dim=1).numpy()
            return result
        # q(y_1..K) under the head, times p(y_K+1.. | y_1..K) under the continuation, scored with
        # the continuation's own prompt and weights: the density `sample` draws from.
        k = variant.head.decoding.max_new_tokens
        result = self.score(prompt, variant.head, [r[:k] for r in seqs])
        longer = [i for i, r in enumerate(seqs) if len(r) > k]
        if longer:
            for rows, tok, mask in self._token_chunks(prompt, variant.continuation, [seqs[i] for i in longer]):
                tail = torch.where(mask, tok, 0.0)[:, k:].sum(dim=1).numpy()
                result[[longer[r] for r in rows]] += tail
        return result

    def _token_chunks(self, prompt: str, variant: Variant, seqs: list[list[int]]):
        """Teacher-forced processed log-probs of every token of `seqs` under a variant that draws
        every token, by chunk: (indices into seqs, (b, width) float64 log-probs, mask of real tokens)."""
        key = self._processing_key(variant)
        for rows, toks, mask in self._shared_token_chunks(prompt, variant, seqs, {key: np.ones(len(seqs), dtype=bool)}):
            yield rows, toks[key], mask

    @staticmethod
    def _pass_key(ids: list[int], variant: Variant) -> tuple:
        """What a forward pass depends on: the rendered prompt, the weights (adapter and its scale)
        and the steering. Variants with one key differ only in how their logits become log-probs
        (`_processing_key`: decoding and token tilt) and share one pass."""
        scale = variant.adapter_scale if variant.adapter is not None else None
        return tuple(ids), variant.adapter, scale, variant.steering

    @staticmethod
    def _processing_key(variant: Variant) -> tuple[Decoding, Tilt | None]:
        """How a variant turns logits into log-probs: its decoding without the length (which only
        bounds the responses), so that a return-to-target head (cut at K tokens) shares the
        processing of its untruncated twin, and its token tilt."""
        return replace(variant.decoding, max_new_tokens=1), variant.tilt

    @torch.inference_mode()
    def score_many(self, prompt: str, variants: Sequence[Variant], responses: Sequence[Sequence[int]],
                   need: np.ndarray | None = None) -> np.ndarray:
        """`score` under every variant, one forward pass per distinct (prompt, adapter, scale,
        steering) over the rows that need any of its variants; each decoding processes that pass's
        logits once. A variant that returns to the target is two segments: its head (first K
        tokens, a pass cut at K tokens) and its continuation (tokens after K, sharing the
        continuation's pass, usually the target's own).

        `batched_scoring` (the default): the passes of different prompts and adapters run as one
        batch (`_mixed_token_chunks`: each distinct prompt and adapter prefilled once per chunk,
        the responses of every pass in one forward call), except those that cannot share a batch
        exactly (`_joins_batch`): a steered pass (its hooks edit every row of a forward call), an
        adapter peft cannot apply per row (DoRA and other LoRA variants, modules_to_save), and the
        second scale of one adapter (peft keeps one scale per adapter), which run alone.
        `batched_scoring=False`: each pass alone. `shared_scoring=False`: `score` once per variant
        on the rows that need it (`Engine.score_many`), each variant its own passes."""
        if not self.shared_scoring:
            return super().score_many(prompt, variants, responses, need)
        seqs = [list(map(int, r)) for r in responses]
        need = score_need(need, len(seqs), len(variants))
        out = np.full(need.shape, np.nan)
        vocab = self.vocab_size
        if any(t < 0 or t >= vocab for r in seqs for t in r):
            raise InputError("a response holds a token id outside the vocabulary")
        # pass key -> (a variant of that key, [(column, processing, first token, end or None)])
        groups: dict[tuple, tuple[Variant, list]] = {}
        for j, variant in enumerate(variants):
            rows = np.flatnonzero(need[:, j])
            if not rows.size:
                continue
            longest = max(len(seqs[i]) for i in rows)
            if longest > variant.decoding.max_new_tokens:
                raise InputError(f"a response of {longest} tokens is longer than "
                                 f"max_new_tokens={variant.decoding.max_new_tokens}")
            if variant.returns:
                k = variant.head.decoding.max_new_tokens
                parts = [(variant.head, 0, k), (variant.continuation, k, None)]
            else:
                parts = [(variant, 0, None)]
            for part, start, end in parts:
                key = self._pass_key(self.rendered(prompt, part), part)
                groups.setdefault(key, (part, []))[1].append((j, self._processing_key(part), start, end))
            out[rows, j] = 0.0
        plan = []  # per pass: (variant, segments, rows of seqs it scores, their cut, wanted processings)
        for part, segments in groups.values():
            rows = np.flatnonzero(need[:, sorted({s[0] for s in segments})].any(axis=1))
            # No token past the last segment's end is scored (a head alone needs its first K).
            end = None if any(s[3] is None for s in segments) else max(s[3] for s in segments)
            # Each processing on the rows that need one of its columns (top-p sorts the vocabulary at
            # every position: not free on rows that need it for nothing).
            wanted: dict[tuple, np.ndarray] = {}
            for j, processing, _, _ in segments:
                wanted[processing] = wanted.get(processing, np.zeros(rows.size, dtype=bool)) | need[rows, j]
            plan.append((part, segments, rows, [seqs[i][:end] for i in rows], wanted, end))
        # Passes whose rows can share a batch (the rule of the batched mixture decode: no steering,
        # plain LoRA, one scale per adapter) run together; the others each on its own.
        scales: dict[str, float] = {}
        mixed = [g for g, (part, *_) in enumerate(plan) if self.batched_scoring and self._joins_batch(part, scales)]
        if len(mixed) < 2:
            mixed = []  # a pass alone: `_shared_token_chunks` is the same pass
        for g, (part, segments, rows, cut, wanted, _) in enumerate(plan):
            if g not in mixed:
                for idx, toks, mask in self._shared_token_chunks(prompt, part, cut, wanted):
                    self._add_segments(out, segments, rows[idx], toks, mask)
        if mixed:
            chunks = self._mixed_token_chunks(prompt, [plan[g][0] for g in mixed], [plan[g][3] for g in mixed],
                                              [plan[g][4] for g in mixed], [plan[g][5] for g in mixed])
            for which, idx, toks, mask in chunks:
                for k, g in enumerate(mixed):
                    sel = np.flatnonzero(which == k)
                    if sel.size:
                        picked = torch.from_numpy(sel)
                        self._add_segments(out, plan[g][1], plan[g][2][idx[sel]],
                                           {p: t[picked] for p, t in toks.items()}, mask[picked])
        return out  # NaN stays NaN where a row was in a shared pass for another column only

    @staticmethod
    def _add_segments(out: np.ndarray, segments: list, at: np.ndarray, toks: dict, mask: torch.Tensor) -> None:
        """Add each segment's (column, processing, first token, end) log-probs of rows `at` to `out`."""
        toks = {p: torch.where(mask, t, 0.0) for p, t in toks.items()}
        for j, processing, start, stop in segments:
            out[at, j] += toks[processing][:, start:stop].sum(dim=1).numpy()

    def _mixed_token_chunks(self, prompt: str, parts: Sequence[Variant], seqs: Sequence[list[list[int]]],
                            wanted: Sequence[dict[tuple[Decoding, Tilt | None], np.ndarray]],
                            cuts: Sequence[int | None]):
        """`_shared_token_chunks` for several passes at once: the rows of every pass (`seqs[g]`,
        each under `parts[g]`'s prompt and adapter, processed as `wanted[g]` asks) in shared
        chunks: (pass of each row (index into parts), indices into its seqs, {processing: (b,
        width) float64 log-probs, NaN where its pass does not want it}, mask of real tokens).

        Per chunk, every pass present is prefilled once (one left-padded batch of the distinct
        prompts, each with its adapter), the KV cache rows copied to the responses of each pass,
        then one pass over every response: a row's attention mask hides its prompt's left padding
        and its positions count its own prompt's tokens, so it computes what its pass computes
        alone, to float32 round-off (tests/engines/test_eng_score_many.py).

        `cuts[g]`: the token count pass g's rows are cut at (a returning head's K), None for
        whole responses. Passes of one cut are chunked together, each cut shorter than the
        longest row apart: a head's short rows would otherwise pad to the long rows they share a
        small chunk with (`_chunks` lets a chunk under SCORE_MIN_CHUNK positions absorb padding),
        32 rows of 4 tokens computing 24 positions each (measured: 25-33% more CPU on return +
        system K=3). A cut no shorter than every row (every component returning: the caller cuts
        all responses at the weight horizon) changes nothing and keeps its rows with the others."""
        prompts = [self.rendered(prompt, v) for v in parts]
        processings = list(dict.fromkeys(p for w in wanted for p in w))
        biases = {p: self._tilt(p[1]) for p in processings}  # each tilt file read once
        longest = max((len(r) for s in seqs for r in s), default=0)
        cuts = [longest if c is None else min(c, longest) for c in cuts]
        classes = sorted(set(cuts))
        items = [(g, i) for g, s in enumerate(seqs) for i in range(len(s))]
        # By cut, then shortest first (a chunk pads to its longest), and by pass within a length,
        # so that a chunk holds few distinct prompts to prefill.
        items.sort(key=lambda it: (classes.index(cuts[it[0]]), len(seqs[it[0]][it[1]]), it[0]))
        ordered = [seqs[g][i] for g, i in items]
        cls = [classes.index(cuts[g]) for g, _ in items]
        spans = []  # (start, end) of the chunks of every cut, in order
        first_of = 0
        for c in range(len(classes)):
            last_of = first_of + cls.count(c)
            spans += [(first_of + a, first_of + b) for a, b in self._chunks(ordered[first_of:last_of])]
            first_of = last_of
        part_of = np.array([g for g, _ in items], dtype=np.int64)
        index_of = np.array([i for _, i in items], dtype=np.int64)
        rows_of = {p: np.array([p in wanted[g] and bool(wanted[g][p][i]) for g, i in items]) for p in processings}
        with self._mixed_weights(parts) as names:
            for start, end in spans:
                chunk = ordered[start:end]
                if max(len(s) for s in chunk) == 0:
                    continue
                x, mask = self._padded(chunk)
                present = list(dict.fromkeys(part_of[start:end].tolist()))
                which = torch.tensor([present.index(g) for g in part_of[start:end].tolist()], dtype=torch.long)
                first, rest = self._prompts_then([prompts[g] for g in present],
                                                 None if names is None else [names[g] for g in present],
                                                 which, x[:, :-1].contiguous())
                toks = {}
                for p in processings:
                    sub = np.flatnonzero(rows_of[p][start:end])
                    if sub.size == len(chunk):
                        toks[p] = self._token_logprobs(first, rest, x, p[0], biases[p], which)
                    else:
                        toks[p] = torch.full(x.shape, float("nan"), dtype=torch.float64)
                        if sub.size:
                            sel = torch.from_numpy(sub)
                            picked = None if rest is None else rest[sel.to(rest.device)]
                            toks[p][sel] = self._token_logprobs(first, picked, x[sel], p[0], biases[p], which[sel])
                yield part_of[start:end], index_of[start:end], toks, mask
                checkpoint()

    def _prompts_then(self, prompts: list[list[int]], adapters: list[str] | None, which: torch.Tensor,
                      x: torch.Tensor):
        """`_prompt_then` for rows of several prompts: logits after each prompt, (len(prompts), V),
        and after each token of each row of `x` (b, width), row i continuing prompts[which[i]]
        under adapters[which[i]] (peft's name per row; None: the weights already set), (b, width,
        V) (None when width is 0). One prefill of the distinct prompts, left-padded when their
        lengths differ (as `_sample_batch` prefills), whose KV cache rows are copied to the rows
        that continue them, then one pass over the rows, right-padded (harmless under causal
        attention: a position never sees later ones)."""
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        pmask = None
        if len(set(lengths)) == 1:
            logits, cache = self._forward(torch.tensor(prompts), last_only=True, adapters=adapters)
        else:
            ids = torch.full((len(prompts), width), self._pad, dtype=torch.long)
            pmask = torch.zeros((len(prompts), width), dtype=torch.long)
            for g, p in enumerate(prompts):
                ids[g, width - len(p):] = torch.tensor(p, dtype=torch.long)
                pmask[g, width - len(p):] = 1
            logits, cache = self._forward(ids, last_only=True, mask=pmask,
                                          positions=(pmask.cumsum(dim=1) - 1).clamp(min=0), adapters=adapters)
        first = logits[:, -1, :]
        if x.shape[1] == 0:
            return first, None
        cache.reorder_cache(which.to(self.device))
        row_adapters = None if adapters is None else [adapters[k] for k in which.tolist()]
        if pmask is None:  # every prompt of one length: positions follow the cache as for one prompt
            rest, _ = self._forward(x, cache, adapters=row_adapters)
        else:
            mask = torch.cat([pmask[which], torch.ones((x.shape[0], x.shape[1]), dtype=pmask.dtype)], dim=1)
            positions = torch.tensor(lengths, dtype=torch.long)[which][:, None] + torch.arange(x.shape[1])[None, :]
            rest, _ = self._forward(x, cache, mask=mask, positions=positions, adapters=row_adapters)
        return first, rest

    def _shared_token_chunks(self, prompt: str, variant: Variant, seqs: list[list[int]],
                             wanted: dict[tuple[Decoding, Tilt | None], np.ndarray]):
        """`_token_chunks` for several processings of one pass: (indices into seqs, {processing:
        (b, width) float64 log-probs}, mask of real tokens). The logits are computed once per chunk
        and processed per processing on the rows `wanted` for it (bool over seqs; NaN elsewhere)."""
        ids = self.rendered(prompt, variant)
        steer = self._steering(variant.steering)
        biases = {p: self._tilt(p[1]) for p in wanted}  # each tilt file read once, not once per chunk
        # Shortest first: a chunk pads every response to its longest, so similar lengths go together.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        ordered = [seqs[i] for i in order]
        with self._variant_weights(variant):
            for start, end in self._chunks(ordered):
                chunk = ordered[start:end]
                if max(len(s) for s in chunk) == 0:
                    continue
                x, mask = self._padded(chunk)
                # The last column is never an input whose output is needed: each response token is
                # predicted by the logits after the prompt and after the tokens before it.
                first, rest = self._prompt_then(ids, x[:, :-1].contiguous(), steer)
                toks = {}
                for p, rows in wanted.items():
                    sub = np.flatnonzero(rows[order[start:end]])
                    if sub.size == len(chunk):
                        toks[p] = self._token_logprobs(first, rest, x, p[0], biases[p])
                    else:
                        toks[p] = torch.full(x.shape, float("nan"), dtype=torch.float64)
                        if sub.size:
                            sel = torch.from_numpy(sub)
                            picked = None if rest is None else rest[sel.to(rest.device)]
                            toks[p][sel] = self._token_logprobs(first, picked, x[sel], p[0], biases[p])
                yield order[start:end], toks, mask
                checkpoint()

    @torch.inference_mode()
    def position_logprobs(self, prompt: str, variant: Variant, responses: Sequence[Sequence[int]],
                          columns: Sequence[int]) -> list[np.ndarray]:
        """One teacher-forced pass per chunk of responses: the logits before each token, processed
        as `next_token_logprobs` processes them, at the `columns` only."""
        if variant.returns:  # the head's and the continuation's rows differ by position: the default
            return super().position_logprobs(prompt, variant, responses, columns)
        seqs = [list(map(int, r)) for r in responses]
        cols = torch.as_tensor(np.asarray(columns, dtype=np.int64))
        out: list[np.ndarray] = [np.zeros((0, len(cols)))] * len(seqs)
        ids = self.rendered(prompt, variant)
        steer = self._steering(variant.steering)
        bias = self._tilt(variant.tilt)
        order = [i for i in sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if seqs[i]]
        ordered = [seqs[i] for i in order]
        with self._variant_weights(variant):
            for start, end in self._chunks(ordered):
                chunk = ordered[start:end]
                x, _ = self._padded(chunk)
                logits = self._next_logits(ids, [s[:-1] for s in chunk], steer)  # (b, width, V): before each token
                logp = tilted_logprobs(processed_logprobs(logits, variant.decoding), bias)
                picked = logp[:, :, cols.to(logp.device)].double().cpu().numpy()
                for k, i in enumerate(order[start:end]):
                    out[i] = picked[k, : len(seqs[i])]
                checkpoint()
        return out

    @torch.inference_mode()
    def next_token_logprobs(self, prompt: str, variant: Variant, prefixes: Sequence[Sequence[int]]) -> np.ndarray:
        seqs = [list(map(int, p)) for p in prefixes]
        if variant.returns:
            # The token after a prefix shorter than K comes from the head, any later one from the
            # continuation (the target, with its own prompt).
            k = variant.head.decoding.max_new_tokens
            out = np.zeros((len(seqs), self.vocab_size))
            for chosen, part in ((lambda s: len(s) < k, variant.head), (lambda s: len(s) >= k, variant.continuation)):
                rows = [i for i, s in enumerate(seqs) if chosen(s)]
                if rows:
                    out[rows] = self.next_token_logprobs(prompt, part, [seqs[i] for i in rows])
            return out
        ids = self.rendered(prompt, variant)
        steer = self._steering(variant.steering)
        bias = self._tilt(variant.tilt)
        rows = []
        with self._variant_weights(variant):
            for start, end in self._chunks(seqs):
                chunk = seqs[start:end]
                logits = self._next_logits(ids, chunk, steer)
                last = torch.stack([logits[i, len(s)] for i, s in enumerate(chunk)])
                rows.append(tilted_logprobs(processed_logprobs(last, variant.decoding), bias).cpu().double().numpy())
                checkpoint()
        return np.concatenate(rows) if rows else np.zeros((0, self.vocab_size))

    # -- activations ---------------------------------------------------------------------------

    @torch.inference_mode()
    def mean_last_token_residuals(self, prompts: Sequence[str], *, system_prompt: str | None = None,
                                  progress=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean residual stream (each decoder layer's output) at the last prompt token, and the mean
        of its norm, over prompts rendered as production serves them: (layers, hidden) and (layers,),
        float64 on the CPU. The target's own weights (no adapter, no steering)."""
        layers = decoder_layers(self.model)
        n = len(layers)
        total = torch.zeros((n, int(self.model.config.hidden_size)), dtype=torch.float64)
        norms = torch.zeros(n, dtype=torch.float64)
        rendered = [self.prompt_ids(p, system_prompt) for p in prompts]
        captured: list[torch.Tensor | None] = [None] * n

        def make(i):
            def hook(module, args, output):
                captured[i] = output[0] if isinstance(output, tuple) else output
            return hook

        handles = [layer.register_forward_hook(make(i)) for i, layer in enumerate(layers)]
        try:
            with self._variant_weights(Variant("target")):
                for start in range(0, len(rendered), self.batch_size):
                    batch = rendered[start:start + self.batch_size]
                    # Right padding: under causal attention a real position never sees the padding.
                    x = torch.full((len(batch), max(map(len, batch))), self._pad, dtype=torch.long)
                    for i, ids in enumerate(batch):
                        x[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    kwargs = {self._keep_kw: 1} if self._keep_kw else {}
                    self.model(input_ids=x.to(self.device), use_cache=False, **kwargs)
                    last = torch.tensor([len(ids) - 1 for ids in batch], device=self.device)
                    rows = torch.arange(len(batch), device=self.device)
                    for i in range(n):
                        h = captured[i][rows, last].cpu().double()
                        total[i] += h.sum(0)
                        norms[i] += h.norm(dim=1).sum()
                    if progress is not None:
                        progress(len(batch))
        finally:
            for handle in handles:
                handle.remove()
        return total / len(rendered), norms / len(rendered)

