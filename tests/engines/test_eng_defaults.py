"""The engine contract's optional abilities (`Engine.close`, `adapter_note`, `base_facts`,
`tokenizer`): every engine has them, with documented defaults where it lacks the ability, so that
callers call them instead of probing with hasattr/getattr."""

from typing import Sequence

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Engine, Samples, Variant
from tailmon.errors import InputError

TARGET = Variant("target", Decoding(max_new_tokens=2))


class Minimal(Engine):
    """The abstract primitives only: a one-token vocabulary whose token stops every response."""

    name = "minimal"

    def sample(self, prompt: str, variant: Variant, n: int, seed: int) -> Samples:
        return Samples([[0]] * n, np.zeros(n), [True] * n)

    def score(self, prompt: str, variant: Variant, responses: Sequence[Sequence[int]]) -> np.ndarray:
        return np.zeros(len(responses))

    def next_token_logprobs(self, prompt: str, variant: Variant, prefixes: Sequence[Sequence[int]]) -> np.ndarray:
        return np.zeros((len(prefixes), 1))

    def decode(self, token_ids: Sequence[int]) -> str:
        return ""

    def token_text(self, token_id: int) -> str:
        return ""

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return frozenset({0})

    @property
    def vocab_size(self) -> int:
        return 1


def test_an_engine_without_the_optional_abilities_gets_the_defaults():
    engine = Minimal()
    assert engine.close() is None
    assert engine.adapter_note("/no/such/adapter") is None  # checks nothing, loads nothing
    assert engine.base_facts() is None
    assert engine.tokenizer is None
    assert engine.model_id == "minimal"


def test_the_transformers_engine_has_the_abilities(make_tiny_engine, lora_adapter):
    engine = make_tiny_engine()
    facts = engine.base_facts()
    assert set(facts) >= {"architecture_sha256", "tokenizer_sha256", "chat_template_sha256", "weights_fingerprint"}
    assert engine.adapter_note(lora_adapter) is None and lora_adapter in engine._adapters  # loaded and checked
    assert engine.tokenizer is not None
    engine.close()  # holds nothing outside the process: closing leaves it usable
    assert len(engine.sample("ab", TARGET, 2, seed=0)) == 2


def test_every_engine_class_is_an_engine():
    from tailmon.engines.openai import OpenAIEngine
    from tailmon.engines.transformers_engine import TransformersEngine
    from tailmon.engines.vllm import VllmEngine

    for cls in (TransformersEngine, VllmEngine, OpenAIEngine):
        assert issubclass(cls, Engine)
    # the two that hold something outside the process close it themselves
    assert VllmEngine.close is not Engine.close and OpenAIEngine.close is not Engine.close


def test_adapter_warnings_of_an_engine_without_adapter_checks(lora_adapter):
    from tailmon.estimation.pipeline import EstimationPlan, attach_adapter_warnings
    from tailmon.judges import parse_judge
    from tailmon.proposals import parse_proposal

    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:x"), proposals=[parse_proposal(f"lora:{lora_adapter}")],
                          n_samples=4)
    before = list(plan.components)
    assert attach_adapter_warnings(Minimal(), plan) == [] and plan.components == before


def test_lora_training_needs_an_engine_that_reads_its_weights(tmp_path):
    from tailmon.proposals.lora import Pair, train_lora

    with pytest.raises(InputError, match="LoRA training needs an engine that reads its model's weights .*minimal"):
        train_lora(Minimal(), tmp_path / "out", target=TARGET, pairs=[Pair("a", "b", True)])


def test_an_llm_judge_needs_an_engine_with_a_tokenizer():
    from tailmon.judges.llm import LLMJudge

    judge = LLMJudge("misuse", engine=Minimal())
    with pytest.raises(InputError, match="the judge engine has no tokenizer"):
        judge.score(["p"], ["r"])
