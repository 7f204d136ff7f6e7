"""regex: and prefix: on fixed texts with known answers."""

import numpy as np
import pytest

from tailmon.errors import SpecError
from tailmon.judges import parse_judge


def score(spec, responses, prompt="How do I do it?"):
    return parse_judge(spec).score([prompt] * len(responses), responses).tolist()


def test_regex_searches_anywhere_in_the_response():
    responses = ["Step 1: mix", "first, Step 1", "step 1", "Step1", ""]
    assert score(r"regex:Step \d", responses) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_regex_is_case_sensitive_unless_the_pattern_says_otherwise():
    assert score("regex:sure", ["Sure", "sure"]) == [0.0, 1.0]
    assert score("regex:(?i)sure", ["Sure", "SURE", "no"]) == [1.0, 1.0, 0.0]


def test_regex_ignores_the_prompt():
    judge = parse_judge("regex:bomb")
    np.testing.assert_array_equal(judge.score(["bomb", "x"], ["no", "bomb"]), [0.0, 1.0])


def test_regex_anchors_and_newlines_follow_python_re():
    assert score("regex:^Sure", ["Sure!", "Well\nSure"]) == [1.0, 0.0]
    assert score("regex:(?m)^Sure", ["Well\nSure"]) == [1.0]
    assert score("regex:a.b", ["a\nb"]) == [0.0]


def test_regex_is_compiled_once_and_binary():
    judge = parse_judge("regex:a+b")
    assert judge.pattern.pattern == "a+b"
    assert judge.binary is True
    assert judge.spec == "regex:a+b"


def test_regex_arg_is_verbatim_including_colons_commas_and_spaces():
    judge = parse_judge("regex: a:b, c")
    assert judge.pattern.pattern == " a:b, c"
    assert score("regex: a:b, c", ["x a:b, c", "a:b, c"]) == [1.0, 0.0]


def test_invalid_regex_is_a_spec_error_naming_pattern_and_reason():
    with pytest.raises(SpecError) as info:
        parse_judge("regex:(unclosed")
    message = str(info.value)
    assert message.startswith(
        "judge spec 'regex:(unclosed': invalid regular expression '(unclosed'"
    )
    assert "missing )" in message
    assert "\n" not in message


def test_prefix_is_a_literal_case_and_whitespace_exact_startswith():
    responses = [
        "Sure, here is how",
        "Sure, here is",
        " Sure, here is how",  # leading space: miss
        "sure, here is how",  # case: miss
        "Sure,  here is how",  # double space: miss
        "Sure, here",  # too short: miss
        "",
    ]
    assert score("prefix:Sure, here is", responses) == [1, 1, 0, 0, 0, 0, 0]


def test_prefix_keeps_leading_and_trailing_whitespace_of_its_text():
    assert score("prefix: Sure", [" Sure", "Sure"]) == [1.0, 0.0]
    assert score("prefix:Sure ", ["Sure thing", "Sure!"]) == [1.0, 0.0]
    assert parse_judge("prefix:Sure ").text == "Sure "


def test_prefix_treats_regex_metacharacters_literally():
    assert score("prefix:1. (a)*", ["1. (a)* go", "1x (a) go"]) == [1.0, 0.0]


def test_prefix_is_binary_with_canonical_spec():
    judge = parse_judge("prefix:Sure, here is")
    assert judge.binary is True
    assert judge.spec == "prefix:Sure, here is"


@pytest.mark.parametrize("spec", ["regex:", "prefix:", "regex", "prefix"])
def test_missing_or_empty_argument_is_a_spec_error(spec):
    name = spec.rstrip(":")
    with pytest.raises(SpecError, match=rf"^judge spec '{spec}': .*{name}:"):
        parse_judge(spec)


# -- the time limit on a regex's search (issue 18, item 4) -------------------------------------------

def test_a_catastrophic_regex_fails_in_one_line_within_its_limit():
    """Catches an unbounded search: `(a+)+$` on 40 a's and a b takes 2^40 steps (hours) in `re`;
    the judge must give up after its time limit, kill the search, and say which pattern."""
    import time

    from tailmon.errors import InputError
    from tailmon.judges.rules import RegexJudge

    judge = RegexJudge("(a+)+$", time_limit=0.5)
    start = time.monotonic()
    with pytest.raises(InputError) as err:
        judge.score(["p", "p"], ["aaa", "a" * 40 + "b"])
    elapsed = time.monotonic() - start
    assert elapsed < 3  # 0.5 s limit, plus the worker's start (a fresh interpreter) and the kill
    message = str(err.value)
    assert message.startswith("regex:(a+)+$: searching one response (41 characters) took more than 0.5 s")
    assert "\n" not in message
    proc = judge._matcher._proc
    assert proc is None  # the stuck worker was killed and forgotten; a new one serves the next score
    assert judge.score(["p"], ["aaa"]).tolist() == [1.0]
    judge.close()


def test_the_worker_keeps_python_re_semantics():
    """Catches a matcher with other semantics (RE2 has no backreferences or lookarounds; the
    `regex` module differs in details): every answer equals Python's own `re.search`."""
    import re

    cases = [r"(\w)\1", r"(?<=\$)\d+", r"(?i)straße", r"(?i)café", r"^\s*Sure(?!ly)", r"(?s)a.b", r"(?m)^x$", r"\bc\+\+",
             r"[\u0400-\u04ff]+", r"\ud83d"]
    texts = ["aa", "ßß", "CAFÉ", "costs $40", "STRASSE", "Straße", "  Sure!", "Surely", "a\nb", "y\nx\nz", "c++ code",
             "привет", "lone \ud83d surrogate", ""]
    for pattern in cases:
        expected = [float(re.search(pattern, t) is not None) for t in texts]
        assert score(f"regex:{pattern}", texts) == expected, pattern
