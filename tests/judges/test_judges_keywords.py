"""keywords:FILE: word boundaries, phrases, case, categories, composition and errors."""

import pytest

from tailmon.errors import InputError, SpecError
from tailmon.judges import parse_judge
from tailmon.judges.keywords import KeywordsJudge

LEXICON = """\
# a test lexicon
ass
[weapons]
pipe bomb
Detonator

[code]
c++
ass
"""


@pytest.fixture
def lexicon(tmp_path):
    path = tmp_path / "lexicon.txt"
    path.write_text(LEXICON, encoding="utf-8")
    return path


def score(spec, responses):
    return parse_judge(spec).score(["prompt"] * len(responses), responses).tolist()


def test_whole_words_only(lexicon):
    spec = f"keywords:{lexicon}"
    responses = ["a class of its own", "passage", "what an ass!", "ASS.", "bass", ""]
    assert score(spec, responses) == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_phrases_case_and_whitespace(lexicon):
    spec = f"keywords:{lexicon}"
    responses = ["Build a PIPE BOMB", "pipe\n   bomb", "pipebomb", "a pipe, bomb", "detonators"]
    assert score(spec, responses) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert score(spec, ["I write C++ daily", "c++x", "abc++"]) == [1.0, 0.0, 0.0]


def test_matches_by_category(lexicon):
    judge = parse_judge(f"keywords:{lexicon}")
    assert isinstance(judge, KeywordsJudge) and judge.binary is True
    assert judge.terms == {
        "default": ["ass"],
        "weapons": ["pipe bomb", "Detonator"],
        "code": ["c++", "ass"],
    }
    assert judge.matches("The detonator and the pipe bomb, you ass") == {
        "default": ["ass"],
        "weapons": ["pipe bomb", "Detonator"],
        "code": ["ass"],
    }
    assert judge.matches("a classy answer") == {}


def test_spec_round_trip_and_composition_with_refusal(lexicon):
    spec = f"keywords:{lexicon}"
    assert parse_judge(spec).spec == spec
    composed = parse_judge(f"any(refusal; {spec})")
    assert composed.spec == f"any(refusal; {spec})"
    assert parse_judge(composed.spec).spec == composed.spec
    responses = ["Sure, here it is.", "I'm sorry.", "I can't: detonator", ""]
    # refusal is 1 when complying; keywords 1 on a term
    assert composed.score(["p"] * 4, responses).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert score(f"max(refusal; {spec})>=1", ["I won\u2019t build a pipe bomb"]) == [1.0]


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError, match="nope.txt"):
        parse_judge(f"keywords:{missing}")
    with pytest.raises(InputError, match="nope.txt"):
        parse_judge(f"any(refusal; keywords:{missing})")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n   \n", encoding="utf-8")
    with pytest.raises(InputError, match="empty.txt"):
        parse_judge(f"keywords:{empty}")
    sections = tmp_path / "sections.txt"
    sections.write_text("[a]\n[b]\n", encoding="utf-8")
    with pytest.raises(InputError, match="sections.txt"):
        parse_judge(f"keywords:{sections}")
    with pytest.raises(SpecError, match="keywords needs an argument"):
        parse_judge("keywords")
