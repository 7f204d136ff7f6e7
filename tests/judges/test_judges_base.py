"""The Judge contract: output shape and dtype, validation, and the per-instance score cache."""

import numpy as np
import pytest

from tailmon.errors import InputError, RuntimeFailure
from tailmon.judges import Judge, parse_judge


class LengthJudge(Judge):
    """Scores len(response) / 10, capped at 1; counts what reaches `_score_batch`."""

    def __init__(self, out=None):
        super().__init__()
        self.spec = "length"
        self.calls: list[list[tuple[str, str]]] = []
        self.out = out

    def _score_batch(self, prompts, responses):
        self.calls.append(list(zip(prompts, responses)))
        if self.out is not None:
            return self.out
        return np.array([min(len(r), 10) / 10 for r in responses])


def test_scores_are_float64_in_unit_interval_one_per_pair():
    judge = LengthJudge()
    out = judge.score(["p", "p", "q"], ["", "abcde", "x" * 30])
    assert out.dtype == np.float64
    assert out.shape == (3,)
    np.testing.assert_array_equal(out, [0.0, 0.5, 1.0])


def test_empty_batch_returns_empty_float64_array_without_calling_the_judge():
    judge = LengthJudge()
    out = judge.score([], [])
    assert out.dtype == np.float64 and out.shape == (0,)
    assert judge.calls == []


def test_cache_scores_each_pair_once_across_and_within_calls():
    judge = LengthJudge()
    first = judge.score(["a", "a", "b"], ["xy", "xy", "xy"])
    assert judge.calls == [[("a", "xy"), ("b", "xy")]]  # duplicates collapsed, order kept
    second = judge.score(["b", "c", "a"], ["xy", "xyz", "xy"])
    assert judge.calls[1] == [("c", "xyz")]  # only the unseen pair
    np.testing.assert_array_equal(first, [0.2, 0.2, 0.2])
    np.testing.assert_array_equal(second, [0.2, 0.3, 0.2])
    judge.score(["a", "b", "c"], ["xy", "xy", "xyz"])
    assert len(judge.calls) == 2  # fully cached: no call at all


def test_cache_key_includes_the_prompt():
    judge = LengthJudge()
    judge.score(["a"], ["r"])
    judge.score(["b"], ["r"])
    assert judge.calls == [[("a", "r")], [("b", "r")]]


def test_clear_cache_forces_rescoring():
    judge = LengthJudge()
    judge.score(["a"], ["r"])
    judge.clear_cache()
    judge.score(["a"], ["r"])
    assert len(judge.calls) == 2


def test_composite_judges_reuse_their_childrens_caches():
    judge = parse_judge("max(regex:a; prefix:b)>=0.5")
    out = judge.score(["p"] * 3, ["a", "bc", "c"])
    np.testing.assert_array_equal(out, [1.0, 1.0, 0.0])
    regex = judge.inner.children[0]
    assert set(regex._cache) == {("p", "a"), ("p", "bc"), ("p", "c")}


def test_accepts_any_sequence_including_tuples_and_generators_of_str():
    judge = LengthJudge()
    out = judge.score(("p" for _ in range(2)), ("a", "abc"))
    np.testing.assert_array_equal(out, [0.1, 0.3])


def test_mismatched_lengths_are_an_input_error():
    with pytest.raises(InputError, match="2 prompts but 1 responses"):
        LengthJudge().score(["a", "b"], ["x"])


def test_non_string_inputs_are_an_input_error():
    with pytest.raises(InputError, match="must be str, got NoneType"):
        LengthJudge().score(["a"], [None])


@pytest.mark.parametrize(
    "out, message",
    [
        (np.array([0.5, 0.5]), "returned 2 scores for 1 responses"),
        (np.array([1.5]), r"outside \[0, 1\]"),
        (np.array([np.nan]), r"outside \[0, 1\]"),
    ],
)
def test_bad_judge_output_is_a_runtime_failure(out, message):
    with pytest.raises(RuntimeFailure, match=message):
        LengthJudge(out=out).score(["a"], ["x"])


def test_rounding_overshoot_is_clipped():
    out = LengthJudge(out=np.array([1 + 1e-12, -1e-12])).score(["a", "b"], ["x", "y"])
    np.testing.assert_array_equal(out, [1.0, 0.0])


def test_binary_defaults_to_false_and_repr_names_the_spec():
    judge = LengthJudge()
    assert judge.binary is False
    assert repr(judge) == "LengthJudge('length')"
