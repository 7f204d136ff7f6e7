"""Shared fixtures: a tiny random Llama built in memory, a LoRA adapter for it, the embedded model.

The tiny model is small enough that every response distribution with a few tokens can be
enumerated exactly, so the engine, the exact prefix computation and the estimation pipeline are
tested against exact probabilities rather than against themselves.

Tiny tokenizer: a `tokenizers` WordLevel model over 18 tokens (2 special ChatML tokens, `<unk>`
and 15 word pieces). The pre-tokenizer splits on the vocabulary itself (longest piece first) and
the decoder is `Fuse`, so decode(ids) is exactly the concatenation of the token texts (checked
in test_eng_tiny_fixture.py). "ab" has a token of its own and is also "a" + "b", which gives
prefix events several tokenisations.

Tiny model: LlamaConfig(hidden 32, 2 layers, 4 heads, 2 KV heads), torch.manual_seed(0),
initializer_range 0.05, float32. Two deterministic edits make it useful for tests:
  * the lm_head is scaled by 6, so next-token distributions are peaked (the largest token has
    ~0.2-0.5) while every token keeps a non-negligible mass (the smallest ~1e-4 .. 5e-3);
  * the EOS row of lm_head gets + 3 * mu / |mu|^2, mu the mean final hidden state over two fixed
    texts, which raises the EOS logit by ~3 on average, so responses do end (P(EOS) ~ 0.002-0.45
    depending on the position) and both finished and cut responses occur.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

# The run store's fixtures (real SQLite and PostgreSQL databases), for every package's tests.
pytest_plugins = ["store_fixtures"]

# One intra-op thread unless TAILMON_TEST_THREADS says otherwise. The tiny model's ops are far
# too small to gain from more, and when the cores are shared with other jobs, OpenMP workers
# spinning for a busy core are catastrophic: on 2 oversubscribed cores the tiny-model tests took
# 132 s instead of 8 s, and one embedded-model test 78 s instead of 5 s, with torch's default of
# 2 threads. On a free machine the embedded tests may run faster with TAILMON_TEST_THREADS=2.
torch.set_num_threads(int(os.environ.get("TAILMON_TEST_THREADS", "1")))

SPECIAL = ["<|im_start|>", "<|im_end|>"]
WORDS = ["<unk>", "\n", "system", "user", "assistant", "Sure", ",", " here", " is", "I", " cannot",
         " no", "a", "b", "ab", "!"]
VOCAB = SPECIAL + WORDS  # ids 0 .. 17; EOS = <|im_end|> = 1
EOS_ID = 1
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LM_HEAD_SCALE = 6.0
INIT_STD = 0.05
EOS_SHIFT = 3.0


def build_tiny_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    pieces = sorted(WORDS[1:], key=len, reverse=True)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(re.escape(p) for p in pieces)), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=EOS_ID, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
        initializer_range=INIT_STD,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
        hidden = []
        for text in ["<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\nSure, here is",
                     "<|im_start|>user\nI cannot<|im_end|>\n<|im_start|>assistant\nab!a b"]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            hidden.append(model.model(torch.tensor([ids])).last_hidden_state[0])
        mu = torch.cat(hidden).mean(0)
        model.lm_head.weight[EOS_ID] += EOS_SHIFT * mu / mu.norm() ** 2
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_engine(tiny_tokenizer):
    """Factory of fresh engines over fresh (identical) tiny models: use one whenever a test loads
    a LoRA adapter, since peft wraps and mutates the engine's model."""
    from tailmon.engines.transformers_engine import TransformersEngine

    def make(batch_size: int = 64):
        return TransformersEngine(build_tiny_model(tiny_tokenizer), tiny_tokenizer, model_id="tiny",
                                  batch_size=batch_size)

    return make


@pytest.fixture(scope="session")
def tiny_engine(make_tiny_engine):
    """The shared tiny engine. Never give it a LoRA variant (use make_tiny_engine)."""
    engine = make_tiny_engine()
    yield engine
    from peft import PeftModel

    assert not isinstance(engine.model, PeftModel), "a test loaded a LoRA adapter into the shared tiny engine"


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory, tiny_tokenizer):
    """A random LoRA adapter (r=4 on q_proj, v_proj, non-zero B) for the tiny model, on disk."""
    from peft import LoraConfig, get_peft_model

    path = tmp_path_factory.mktemp("tiny-lora")
    model = build_tiny_model(tiny_tokenizer)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def embedded_engine():
    """SmolLM2-135M-Instruct from the tailmon cache (TAILMON_CACHE_DIR); skipped when not pulled.

    Loading costs ~1 s; every forward pass of the 135M model costs tens of ms on a free CPU
    (seconds when the cores are oversubscribed), so embedded tests stay tiny."""
    from tailmon.engines.transformers_engine import TransformersEngine
    from tailmon.engines.models import DEFAULT_MODEL, cached_path, is_cached

    if not is_cached(DEFAULT_MODEL):
        if os.environ.get("TAILMON_REQUIRE_EMBEDDED") == "1":  # `make test` and CI: never skip
            pytest.fail(f"{DEFAULT_MODEL} is not in the tailmon cache ({cached_path(DEFAULT_MODEL)})")
        pytest.skip(f"{DEFAULT_MODEL} is not in the tailmon cache ({cached_path(DEFAULT_MODEL)}); "
                    "set TAILMON_CACHE_DIR or run `tailmon models pull`")
    return TransformersEngine.load(DEFAULT_MODEL)


def enumerate_responses(engine, prompt, variant):
    """Every response the variant can produce, with its exact processed log-prob.

    A response stops at a stop token (included) or at max_new_tokens; tokens outside the
    truncated support (-inf) are skipped. Returns (list of id lists, np.ndarray of log-probs).
    """
    stops = engine.stop_token_ids
    m = variant.decoding.max_new_tokens
    done_ids, done_lp = [], []
    frontier = [([], 0.0)]
    for depth in range(m):
        rows = engine.next_token_logprobs(prompt, variant, [ids for ids, _ in frontier])
        nxt = []
        for (ids, lp), row in zip(frontier, rows):
            for t in np.flatnonzero(np.isfinite(row)):
                seq, value = ids + [int(t)], lp + float(row[t])
                if int(t) in stops or depth == m - 1:
                    done_ids.append(seq)
                    done_lp.append(value)
                else:
                    nxt.append((seq, value))
        frontier = nxt
    return done_ids, np.array(done_lp)


@pytest.fixture(scope="session")
def enumerate_all():
    """The brute-force enumerator above, as a fixture (test modules cannot import conftest)."""
    return enumerate_responses


def exact_is_design(engine, prompt, text, plan):
    """Exact (P, sd of p_hat) of the pipeline's IS estimate of P(response starts with `text`).

    Every response any component can draw is enumerated; with the pipeline's realised counts
    n_j (`allocate`) and shares a_j = n_j / n, the stratified estimator's variance is
        Var(p_hat) = (1/n^2) sum_j n_j Var_{q_j}(w h),  w = p / sum_j a_j q_j.
    """
    import math

    from tailmon.engines.base import Decoding, Variant
    from tailmon.estimation.pipeline import allocate

    every = Variant("all", Decoding(max_new_tokens=plan.target.decoding.max_new_tokens))
    seqs, _ = enumerate_responses(engine, prompt, every)
    h = np.array([engine.decode(s).startswith(text) for s in seqs], dtype=float)
    p = np.exp(engine.score(prompt, plan.target, seqs))
    counts = np.array(allocate(plan.n_samples, [c.share for c in plan.components]))
    q = np.exp(np.stack([engine.score(prompt, c.variant, seqs) for c in plan.components], axis=1))
    mix = q @ (counts / plan.n_samples)
    w = np.divide(p, mix, out=np.zeros_like(p), where=mix > 0)
    x = w * h
    var = sum(n_j * (np.sum(q[:, j] * x * x) - np.sum(q[:, j] * x) ** 2) for j, n_j in enumerate(counts) if n_j)
    return float(np.sum(p * h)), math.sqrt(var) / plan.n_samples


@pytest.fixture(scope="session")
def exact_design():
    """`exact_is_design` above, as a fixture."""
    return exact_is_design


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_engine, tmp_path_factory):
    """The tiny model saved as a local model folder, for model references and the CLI."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_engine.model.save_pretrained(folder)
    tiny_engine.tokenizer.save_pretrained(folder)
    return folder
