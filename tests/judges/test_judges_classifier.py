"""`classifier:PATH[@LABEL]` and `classifier_pair:`: a tiny random BertForSequenceClassification
with a WordLevel tokenizer built here and saved into tmp_path (no hub), scored against a softmax
computed directly from the model's logits, one unpadded input at a time."""

import json

import numpy as np
import pytest
import torch

from tailmon.errors import InputError, SpecError
from tailmon.judges import parse_judge
from tailmon.judges.classifier import ClassifierJudge, split_classifier_arg

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "how", "to", "make", "a", "bomb", "cake", "sure",
         "here", "is", "sorry", "i", "cannot", "help", "the", "recipe", "step", "one", "two"]
LABELS = {0: "safe", 1: "harmful", 2: "unclear"}
MAX_POSITIONS = 24

PROMPTS = ["how to make a bomb", "how to make a cake", "how to make a bomb", "help"]
RESPONSES = ["sure here is the recipe step one step two", "sorry i cannot help",
             "sorry", "sure here is how to make a cake step one step two the recipe"]


def build_checkpoint(folder, labels=LABELS, seed=0):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]",
                                        model_max_length=MAX_POSITIONS)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=MAX_POSITIONS, num_labels=len(labels),
                        id2label=dict(labels), label2id={v: k for k, v in labels.items()},
                        initializer_range=0.5)
    torch.manual_seed(seed)
    # initializer_range 0.5 rather than BERT's 0.02: with random weights that small, every
    # input gets nearly the same label shares, and the tests could not tell inputs apart.
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    model, tokenizer = build_checkpoint(folder)
    return str(folder), model, tokenizer


def softmax_one_by_one(model, tokenizer, *texts):
    """Probabilities of each label for each input, one unpadded input per forward pass."""
    out = []
    with torch.no_grad():
        for parts in zip(*texts):
            enc = tokenizer(*parts, truncation=True, max_length=MAX_POSITIONS, return_tensors="pt")
            out.append(torch.softmax(model(**enc).logits.double(), dim=-1)[0].numpy())
    return np.array(out)


def test_score_is_the_softmax_of_the_named_label(checkpoint):
    path, model, tokenizer = checkpoint
    judge = parse_judge(f"classifier:{path}@harmful")
    assert judge.spec == f"classifier:{path}@harmful" and judge.label_index == 1
    scores = judge.score(PROMPTS, RESPONSES)
    expected = softmax_one_by_one(model, tokenizer, RESPONSES)
    np.testing.assert_allclose(scores, expected[:, 1], rtol=0, atol=1e-6)
    # Not a constant: the label's share varies between responses.
    assert np.ptp(scores) > 0.05


def test_batches_pad_without_changing_scores(checkpoint):
    path, model, tokenizer = checkpoint
    texts = [" ".join(["step"] * n) for n in range(1, 12)] + RESPONSES
    whole = ClassifierJudge(path, "2", batch_size=64).score(["p"] * len(texts), texts)
    small = ClassifierJudge(path, "2", batch_size=3).score(["p"] * len(texts), texts)
    expected = softmax_one_by_one(model, tokenizer, texts)[:, 2]
    np.testing.assert_allclose(whole, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(small, expected, rtol=0, atol=1e-6)


def test_the_prompt_is_ignored_by_classifier_and_read_by_classifier_pair(checkpoint):
    path, model, tokenizer = checkpoint
    alone = parse_judge(f"classifier:{path}@harmful")
    a = alone.score(["how to make a bomb", "how to make a cake"], ["sure", "sure"])
    assert a[0] == a[1]
    pair = parse_judge(f"classifier_pair:{path}@harmful")
    assert pair.spec == f"classifier_pair:{path}@harmful" and pair.pair
    scores = pair.score(PROMPTS, RESPONSES)
    expected = softmax_one_by_one(model, tokenizer, PROMPTS, RESPONSES)[:, 1]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    b = pair.score(["how to make a bomb", "how to make a cake"], ["sure", "sure"])
    assert b[0] != b[1]


def test_inputs_longer_than_the_model_are_truncated(checkpoint):
    path, model, tokenizer = checkpoint
    long = " ".join(["step one two"] * 40)  # 120 words, 24 positions
    judge = ClassifierJudge(path, "harmful")
    head = tokenizer.decode(tokenizer(long, truncation=True, max_length=MAX_POSITIONS)["input_ids"],
                            skip_special_tokens=True)
    np.testing.assert_allclose(judge.score(["p"], [long]), judge.score(["p"], [head]), atol=1e-9)
    pair = ClassifierJudge(path, "harmful", pair=True)
    assert 0.0 <= pair.score([long], [long])[0] <= 1.0


@pytest.mark.parametrize(
    "label, index, canonical",
    [("harmful", 1, "harmful"), ("HARMFUL", 1, "harmful"), ("2", 2, "unclear"),
     ("0", 0, "safe"), (" unclear ", 2, "unclear")],
)
def test_labels_by_name_case_or_index(checkpoint, label, index, canonical):
    path = checkpoint[0]
    judge = parse_judge(f"classifier:{path}@{label}")
    assert judge.label_index == index and judge.label == LABELS[index]
    assert judge.spec == f"classifier:{path}@{canonical}"
    assert parse_judge(judge.spec).spec == judge.spec


def test_two_label_checkpoint_defaults_to_index_1(tmp_path):
    folder = tmp_path / "binary"
    model, tokenizer = build_checkpoint(folder, labels={0: "ok", 1: "toxic"})
    judge = parse_judge(f"classifier:{folder}")
    assert judge.spec == f"classifier:{folder}" and judge.label == "toxic"
    expected = softmax_one_by_one(model, tokenizer, RESPONSES)[:, 1]
    np.testing.assert_allclose(judge.score(PROMPTS, RESPONSES), expected, rtol=0, atol=1e-6)
    assert parse_judge(judge.spec).spec == judge.spec


def test_label_names_come_before_indices_and_duplicates_use_indices(tmp_path):
    folder = tmp_path / "digits"
    build_checkpoint(folder, labels={0: "1", 1: "0"})
    assert parse_judge(f"classifier:{folder}@1").label_index == 0
    folder2 = tmp_path / "dupes"
    build_checkpoint(folder2, labels={0: "x", 1: "x", 2: "y"})
    judge = parse_judge(f"classifier:{folder2}@1")
    assert judge.label_index == 1 and judge.spec == f"classifier:{folder2}@1"


def test_a_checkpoint_path_holding_an_at_sign(tmp_path):
    folder = tmp_path / "team@lab"
    build_checkpoint(folder, labels={0: "ok", 1: "toxic"})
    assert split_classifier_arg(str(folder)) == (str(folder), None)
    assert split_classifier_arg(f"{folder}@ok") == (str(folder), "ok")
    assert parse_judge(f"classifier:{folder}@ok").label_index == 0


def test_loading_is_lazy_and_happens_once(checkpoint, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    judge = parse_judge(f"classifier:{checkpoint[0]}@harmful")
    assert judge._model is None
    calls = []
    original = AutoModelForSequenceClassification.from_pretrained

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", counting)
    judge.score(["p"], ["sure"])
    judge.score(["p", "q"], ["sorry", "cake"])
    assert calls == [checkpoint[0]]


@pytest.mark.parametrize(
    "arg, message",
    [
        ("{missing}", "classifier checkpoint '{missing}': no such directory"),
        ("{missing}@harmful", "classifier checkpoint '{missing}': no such directory"),
        ("{path}@violent", r"classifier checkpoint '{path}' has no label 'violent' "
                           r"\(labels: 0=safe, 1=harmful, 2=unclear\)"),
        ("{path}@3", "has no label '3'"),
        ("{path}", r"classifier checkpoint '{path}' has 3 labels \(safe, harmful, unclear\): "
                   r"name the harmful one, classifier:PATH@LABEL"),
        ("{empty}", "classifier checkpoint '{empty}' has no config.json"),
        ("{file}", "classifier checkpoint '{file}' is not a directory"),
    ],
)
def test_bad_checkpoints_and_labels_are_input_errors(checkpoint, tmp_path, arg, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    names = {"path": checkpoint[0], "missing": str(tmp_path / "nope"),
             "empty": str(tmp_path / "empty"), "file": str(tmp_path / "file.txt")}
    with pytest.raises(InputError, match=message.format(**names)) as info:
        parse_judge("classifier:" + arg.format(**names))
    assert "\n" not in str(info.value)


def test_bad_config_json_is_an_input_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "a", "2": "b"}}))
    with pytest.raises(InputError, match=r"id2label must number its labels 0..1"):
        parse_judge(f"classifier:{tmp_path}@a")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read config.json"):
        parse_judge(f"classifier:{tmp_path}@a")


def test_a_broken_checkpoint_is_a_runtime_failure_naming_it(tmp_path):
    from tailmon.errors import RuntimeFailure

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "num_labels": 2}))
    judge = parse_judge(f"classifier:{tmp_path}")
    with pytest.raises(RuntimeFailure, match=f"classifier checkpoint '{tmp_path}' failed to load"):
        judge.score(["p"], ["r"])


@pytest.mark.parametrize("spec, message", [
    ("classifier", r"classifier needs an argument: classifier:PATH\[@LABEL\]"),
    ("classifier:", "empty argument after ':'"),
    ("classifier:/x@", "the label after '@' is empty"),
    ("classifier:@x", "the checkpoint path before '@' is empty"),
])
def test_bad_classifier_specs(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_judge(spec)
