"""Model references: embedded names, local folders, hub ids (`tailmon.engines.models.resolve`)."""

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.engines.transformers_engine import TransformersEngine
from tailmon.engines.models import DEFAULT_MODEL, resolve
from tailmon.errors import InputError


@pytest.mark.parametrize("ref", ["no-such-model", "./missing-folder", "/nonexistent/path/to/model",
                                 "~/surely/not/here", "a/b/c"])
def test_unknown_names_and_missing_paths_are_input_errors(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError):
        resolve(ref)


def test_folder_without_config_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        resolve(str(tmp_path))


def test_embedded_model_not_in_cache_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILMON_CACHE_DIR", str(tmp_path))
    with pytest.raises(InputError, match="not in the cache"):
        resolve(DEFAULT_MODEL)
    with pytest.raises(InputError):
        TransformersEngine.load(DEFAULT_MODEL)


def test_hub_ids_pass_through_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_local_folder_loads_the_same_model(tiny_engine, tmp_path):
    folder = tmp_path / "tiny-model"
    tiny_engine.model.save_pretrained(folder)
    tiny_engine.tokenizer.save_pretrained(folder)
    assert resolve(str(folder)) == folder
    loaded = TransformersEngine.load(str(folder))
    assert loaded.model_id == str(folder)
    assert loaded.stop_token_ids == tiny_engine.stop_token_ids
    assert loaded.vocab_size == tiny_engine.vocab_size
    assert loaded.prompt_ids("ab", "Sure") == tiny_engine.prompt_ids("ab", "Sure")
    variant = Variant("v", Decoding(temperature=0.7, max_new_tokens=6))
    a = tiny_engine.sample("ab", variant, 30, seed=5)
    b = loaded.sample("ab", variant, 30, seed=5)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
    assert [loaded.decode(r) for r in b.token_ids] == [tiny_engine.decode(r) for r in a.token_ids]


def test_unknown_dtype_is_an_input_error(tiny_engine, tmp_path):
    folder = tmp_path / "tiny-model"
    tiny_engine.model.save_pretrained(folder)
    tiny_engine.tokenizer.save_pretrained(folder)
    with pytest.raises(InputError, match="dtype"):
        TransformersEngine.load(str(folder), dtype="float7")
