"""toxicity: the bundled alt-profanity-check model, and its threshold shorthand."""

import importlib.util

import numpy as np
import pytest

from tailmon.errors import InputError, SpecError
from tailmon.judges import parse_judge

PROFANE = "You are a fucking idiot and a piece of shit."  # library value: 1.00
BENIGN = "Sure, here is a recipe for banana bread."  # library value: 0.03


def test_toxicity_is_high_on_profanity_and_low_on_benign_text():
    judge = parse_judge("toxicity")
    out = judge.score(["Say something.", "Say something."], [PROFANE, BENIGN])
    assert out.dtype == np.float64
    assert out[0] > 0.5
    assert out[1] < 0.2
    assert judge.binary is False
    assert judge.spec == "toxicity"


def test_toxicity_scores_the_response_not_the_prompt():
    out = parse_judge("toxicity").score([PROFANE], [BENIGN])
    assert out[0] < 0.2


def test_toxicity_handles_empty_responses():
    out = parse_judge("toxicity").score(["p"], [""])
    assert 0.0 <= out[0] < 0.2


@pytest.mark.parametrize("spec", ["toxicity:0.5", "toxicity>=0.5", "toxicity >= 0.5"])
def test_toxicity_threshold_forms_are_equivalent(spec):
    judge = parse_judge(spec)
    assert judge.spec == "toxicity>=0.5"
    assert judge.binary is True
    np.testing.assert_array_equal(judge.score(["p", "p"], [PROFANE, BENIGN]), [1.0, 0.0])


@pytest.mark.parametrize("arg", ["abc", "1.5", "-0.1", "nan", "0.5x"])
def test_bad_toxicity_threshold_is_a_spec_error(arg):
    with pytest.raises(SpecError) as info:
        parse_judge(f"toxicity:{arg}")
    assert str(info.value) == (
        f"judge spec 'toxicity:{arg}': threshold must be a number in [0, 1], got {arg!r}"
    )


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "profanity_check" else real(name, *a),
    )
    with pytest.raises(InputError, match="pip install alt-profanity-check"):
        parse_judge("toxicity")
