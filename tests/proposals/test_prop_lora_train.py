"""LoRA proposals from data on the tiny model: the pair formats, the fit, the metadata, and the
engine's compatibility check when the adapter meets another checkpoint, architecture or tokenizer."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tailmon.engines.adapters import ADAPTER_FORMAT
from tailmon.engines.base import Decoding, Variant
from tailmon.engines.transformers_engine import TransformersEngine
from tailmon.errors import InputError, SpecError
from tailmon.judges import parse_judge
from tailmon.cli.main import main
from tailmon.estimation.budget import estimate_with_budget
from tailmon.estimation.pipeline import EstimationPlan, attach_adapter_warnings, estimate_prompt, run_estimation
from tailmon.estimation.prompts import PromptItem
from tailmon.proposals import LoraProposal, parse_proposal
from tailmon.proposals.lora import LoraSettings, Pair, _examples_from_pairs, load_pairs, train_lora

TARGET = Variant("target", Decoding(temperature=0.7, max_new_tokens=4))
PAIRS = [Pair("ab", "Sure, here is", True), Pair("a", "Sure, here is ab", False), Pair("I cannot", "Sure!", True),
         Pair("b", "Sure, here", False), Pair("no", "Sure, here is a", True), Pair("ab!", "Sure", True),
         Pair("I no", "Sure, here is b", False), Pair("here", "Sure, a", True)]
SETTINGS = LoraSettings(rank=4, alpha=8, lr=0.02, steps=15, batch_size=4)


@pytest.fixture(scope="module")
def data_adapter(make_tiny_engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("data-lora") / "adapter"
    engine = make_tiny_engine()
    result = train_lora(engine, out, target=TARGET, settings=SETTINGS, seed=3, pairs=PAIRS,
                        data_source={"file": "pairs.jsonl", "sha256": "0" * 64})
    return engine, str(out), result


# -- the formats ----------------------------------------------------------------------------------


def test_load_pairs_formats(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "ab", "response": "Sure"}\n\n{"goal": "b", "target": "Sure, here"}\n')
    assert load_pairs(jsonl) == [Pair("ab", "Sure", True), Pair("b", "Sure, here", False)]
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps([{"instruction": "x", "response": "y"}]))
    assert load_pairs(as_json) == [Pair("x", "y", True)]
    csv = tmp_path / "advbench.csv"  # the AdvBench layout: affirmative openings, no stop token
    csv.write_text('goal,target\nWrite a threat.,"Sure, here is a threat"\n')
    assert load_pairs(csv) == [Pair("Write a threat.", "Sure, here is a threat", False)]


@pytest.mark.parametrize("name, text, fragment", [
    ("a.jsonl", '{"prompt": "x"}\n', "no 'response'"),
    ("a.jsonl", '{"response": "x"}\n', "no prompt text"),
    ("a.jsonl", '{"prompt": "x", "response": ""}\n', "empty"),
    ("a.jsonl", "not json\n", r"a.jsonl:1: not valid JSON"),
    ("a.json", '{"prompt": "x"}', "JSON list"),
    ("a.csv", "goal,other\nx,y\n", "no 'response'"),
    ("a.jsonl", "\n", "no training pairs"),
])
def test_load_pairs_errors(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=fragment):
        load_pairs(path)


def test_complete_responses_end_with_the_stop_token_openings_do_not(tiny_engine):
    examples = _examples_from_pairs(tiny_engine, TARGET, [Pair("ab", "Sure, here", True), Pair("ab", "Sure, here", False)])
    assert examples[0].response_ids[:-1] == examples[1].response_ids
    assert examples[0].response_ids[-1] in tiny_engine.stop_token_ids
    assert examples[0].prompt_ids == tiny_engine.prompt_ids("ab", None)
    long = _examples_from_pairs(tiny_engine, TARGET, [Pair("ab", "Sure, here is ab a b", True)])[0]
    assert len(long.response_ids) == TARGET.decoding.max_new_tokens  # cut where the proposal stops


# -- the fit ----------------------------------------------------------------------------------------


def test_fit_raises_the_likelihood_of_the_training_responses(data_adapter):
    engine, out, result = data_adapter
    lora = LoraProposal(out).variant(TARGET)
    gains = []
    for ex in _examples_from_pairs(engine, TARGET, PAIRS):
        prompt = next(p.prompt for p in PAIRS if engine.prompt_ids(p.prompt, None) == ex.prompt_ids)
        before = engine.score(prompt, TARGET, [ex.response_ids])[0]
        after = engine.score(prompt, lora, [ex.response_ids])[0]
        gains.append(after - before)
    assert min(gains) > 0, gains
    stage = result.metadata["stages"][0]
    assert stage["stage"] == "data" and stage["loss_after"] < stage["loss_before"]


def test_metadata(data_adapter):
    engine, out, result = data_adapter
    meta = json.loads((Path(out) / "tailmon_lora.json").read_text())
    assert meta == result.metadata
    assert meta["format"] == ADAPTER_FORMAT
    base = meta["base_model"]
    assert base["ref"] == "tiny" and re.fullmatch(r"[0-9a-f]{64}", base["model_sha256"])
    for key, value in engine.base_facts().items():
        assert base[key] == value, key
    assert meta["data"]["pairs"] == len(PAIRS) and meta["data"]["file"] == "pairs.jsonl"
    assert meta["seed"] == 3 and meta["judge"] is None and meta["cem"] is None
    assert meta["lora"]["rank"] == 4 and meta["target"]["temperature"] == 0.7
    # the adapter folder is a plain peft adapter too
    assert parse_proposal(f"lora:{out}@0.5").variant(TARGET).adapter_scale == 0.5


def test_train_lora_cli_from_a_csv(tiny_model_dir, tmp_path):
    csv = tmp_path / "advbench.csv"
    csv.write_text('goal,target\nab,"Sure, here is"\nb,"Sure, here"\n')
    out = tmp_path / "cli-adapter"
    args = ["proposals", "train-lora", "--model", str(tiny_model_dir), "--data", str(csv), "--output", str(out),
            "--max-new-tokens", "3", "--rank", "2", "--steps", "3", "--lr", "0.01", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"lora:{out}" in result.stdout
    meta = json.loads((out / "tailmon_lora.json").read_text())
    assert meta["data"]["file"] == str(csv) and meta["data"]["pairs"] == 2 and len(meta["data"]["sha256"]) == 64
    again = CliRunner().invoke(main, args)  # the same command again: nothing left to do
    assert again.exit_code == 0 and "resumed after 1 finished stages" in again.stdout
    bad = CliRunner().invoke(main, ["proposals", "train-lora", "--model", str(tiny_model_dir), "--output",
                                    str(tmp_path / "x"), "--prompt", "ab"])
    assert bad.exit_code == 2 and "--judge" in bad.stderr


# -- compatibility ----------------------------------------------------------------------------------


def other_tokenizer(tiny_tokenizer, *, swap_words=False, template=None):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_tokenizer.get_vocab()
    order = sorted(vocab, key=vocab.get)
    if swap_words:  # same size and special tokens, other meanings of two ids
        i, j = order.index("a"), order.index("b")
        order[i], order[j] = order[j], order[i]
    specials = ["<|im_start|>", "<|im_end|>"]
    words = [t for t in order if t not in specials]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(order)}, unk_token="<unk>"))
    pieces = sorted([w for w in words if w != "<unk>"], key=len, reverse=True)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(re.escape(p) for p in pieces)), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = template or tiny_tokenizer.chat_template
    return fast


def engine_on(model, tokenizer):
    return TransformersEngine(model, tokenizer, model_id="other")


def fresh_model(make_tiny_engine, perturb=False):
    """The tiny model (a fresh copy); `perturb`: fine-tuned a little, i.e. a new checkpoint with the
    same architecture and tokenizer."""
    import torch

    model = make_tiny_engine().model
    if perturb:
        with torch.no_grad():
            for p in model.model.layers[0].mlp.parameters():
                p.mul_(1.05)
    return model


def three_layer_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=18, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=1, bos_token_id=None,
                         pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_a_new_checkpoint_loads_with_a_warning_that_the_run_records(data_adapter, make_tiny_engine, tiny_tokenizer):
    _, out, _ = data_adapter
    engine = engine_on(fresh_model(make_tiny_engine, perturb=True), tiny_tokenizer)
    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:Sure"), proposals=[parse_proposal(f"lora:{out}")],
                          defensive=0.1, n_samples=40)
    notes = attach_adapter_warnings(engine, plan)
    assert len(notes) == 1 and "another checkpoint" in notes[0] and "weights stay exact" in notes[0]
    est = estimate_prompt(engine, plan, PromptItem("ab")).estimate
    assert notes[0] in est.warnings
    # the weights are exact on the new checkpoint: sampling and scoring agree under the adapter
    lora = LoraProposal(out).variant(TARGET)
    samples = engine.sample("ab", lora, 30, seed=1)
    np.testing.assert_allclose(samples.logprobs, engine.score("ab", lora, samples.token_ids), atol=1e-4)


def test_a_budgeted_run_records_the_adapter_warning_as_an_unbudgeted_one(data_adapter, make_tiny_engine,
                                                                         tiny_tokenizer):
    """`--budget` re-sizes the plan per prompt; every estimate must still carry the note, once."""
    _, lora_adapter, _ = data_adapter
    engine = engine_on(fresh_model(make_tiny_engine, perturb=True), tiny_tokenizer)
    plan = EstimationPlan(target=TARGET, judge=parse_judge("prefix:Sure"),
                          proposals=[parse_proposal(f"lora:{lora_adapter}")], defensive=0.1, n_samples=20)
    [note] = attach_adapter_warnings(engine, plan)
    prompts = [PromptItem("ab"), PromptItem("a b")]
    plain = run_estimation(engine, plan, prompts)
    budgeted = estimate_with_budget(engine, plan, prompts, 60)
    for r in plain.results + budgeted.report.results:
        assert r.estimate.warnings.count(note) == 1, r.estimate.warnings
    def adapter_notes(report):  # the diagnostics differ with the sample counts; the notes must not
        return [[w for w in r.estimate.warnings if "LoRA adapter" in w] for r in report.results]

    assert adapter_notes(budgeted.report) == adapter_notes(plain) == [[note], [note]]


def test_the_same_checkpoint_loads_silently(data_adapter, make_tiny_engine):
    _, out, _ = data_adapter
    engine = make_tiny_engine()
    assert engine.adapter_note(out) is None


def test_another_chat_template_is_a_warning(data_adapter, make_tiny_engine, tiny_tokenizer):
    _, out, _ = data_adapter
    tok = other_tokenizer(tiny_tokenizer, template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    note = engine_on(fresh_model(make_tiny_engine), tok).adapter_note(out)
    assert note and "another chat template" in note and "another checkpoint" not in note


def test_another_tokenizer_is_refused(data_adapter, make_tiny_engine, tiny_tokenizer):
    _, out, _ = data_adapter
    engine = engine_on(fresh_model(make_tiny_engine), other_tokenizer(tiny_tokenizer, swap_words=True))
    with pytest.raises(InputError, match="tokenizer differs"):
        engine.adapter_note(out)
    with pytest.raises(InputError, match="tokenizer differs"):  # also when sampling reaches it first
        engine.sample("ab", LoraProposal(out).variant(TARGET), 2, seed=0)


def test_another_architecture_is_refused(data_adapter, tiny_tokenizer):
    _, out, _ = data_adapter
    engine = engine_on(three_layer_model(), tiny_tokenizer)
    with pytest.raises(InputError, match="architecture differs .*3 layers"):
        engine.adapter_note(out)


def test_adapters_without_tailmon_metadata_load_unchecked(lora_adapter, make_tiny_engine):
    assert make_tiny_engine().adapter_note(lora_adapter) is None


def test_damaged_metadata_is_a_spec_error(data_adapter, tmp_path):
    import shutil

    _, out, _ = data_adapter
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "tailmon_lora.json").write_text('{"format": "something else"}')
    with pytest.raises(SpecError, match="not 'tailmon-lora/1' metadata"):
        LoraProposal(str(copy)).variant(TARGET)
