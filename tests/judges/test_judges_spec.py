r"""The spec grammar: thresholds, the `>=` ambiguity rule, composition, canonical specs,
malformed specs, the registry and the light import."""

import subprocess
import sys

import numpy as np
import pytest

from tailmon.errors import SpecError
from tailmon.judges import Judge, describe_judges, parse_judge
from tailmon.judges import spec as spec_module
from tailmon.judges.compose import ThresholdJudge


def score(spec, responses):
    return parse_judge(spec).score(["prompt"] * len(responses), responses).tolist()


class Fixed(Judge):
    """Scores looked up from a dict by response (0.0 when absent)."""

    def __init__(self, values, spec="fixed"):
        super().__init__()
        self.values = values
        self.spec = spec

    def _score_batch(self, prompts, responses):
        return np.array([self.values.get(r, 0.0) for r in responses])


# --- thresholds --------------------------------------------------------------------------------


def test_threshold_is_inclusive_and_binary():
    inner = Fixed({"lo": 0.2, "mid": 0.5, "hi": 0.9})
    judge = ThresholdJudge(inner, 0.5)
    np.testing.assert_array_equal(judge.score(["p"] * 3, ["lo", "mid", "hi"]), [0.0, 1.0, 1.0])
    assert judge.binary is True
    assert judge.spec == "fixed>=0.5"


@pytest.mark.parametrize("t, expected", [("0", [1, 1, 1]), ("1", [0, 0, 0]), (".25", [0, 1, 1])])
def test_threshold_edges(monkeypatch, t, expected):
    monkeypatch.setattr(spec_module, "JUDGES", spec_module.JUDGES.copy())
    spec_module.register_judge("fixed", syntax="fixed", description="test")(
        lambda arg: Fixed({"lo": 0.2, "mid": 0.5, "hi": 0.9})
    )
    assert score(f"fixed>={t}", ["lo", "mid", "hi"]) == expected


def test_threshold_on_a_binary_rule():
    assert score("regex:abc>=0.5", ["xabcx", "ab"]) == [1.0, 0.0]
    assert parse_judge("regex:abc>=0.5").spec == "regex:abc>=0.5"
    assert parse_judge("regex:abc>=1").spec == "regex:abc>=1.0"


# --- the >= ambiguity rule ---------------------------------------------------------------------


def test_regex_containing_non_numeric_ge_is_a_plain_pattern():
    judge = parse_judge("regex:a>=b")
    assert judge.spec == "regex:a>=b" and judge.pattern.pattern == "a>=b"
    assert score("regex:a>=b", ["x a>=b", "a>b"]) == [1.0, 0.0]


def test_regex_with_out_of_range_number_after_ge_is_a_plain_pattern():
    judge = parse_judge("regex:x>=2")
    assert judge.pattern.pattern == "x>=2"
    assert score("regex:x>=2", ["x>=2", "x"]) == [1.0, 0.0]


def test_only_the_last_ge_can_be_a_threshold():
    judge = parse_judge("regex:a>=b>=0.5")
    assert isinstance(judge, ThresholdJudge) and judge.threshold == 0.5
    assert judge.inner.pattern.pattern == "a>=b"


def test_a_trailing_numeric_ge_is_a_threshold_even_in_a_regex():
    judge = parse_judge("regex:x>=0.5")
    assert isinstance(judge, ThresholdJudge)
    assert judge.inner.pattern.pattern == "x"


def test_literal_trailing_ge_number_needs_an_explicit_threshold_or_an_escape():
    judge = parse_judge("prefix:x>=0.5>=1")
    assert judge.inner.text == "x>=0.5"
    assert score("prefix:x>=0.5>=1", ["x>=0.5 y", "x y"]) == [1.0, 0.0]
    assert score(r"regex:x>=0\.5", ["x>=0.5", "x"]) == [1.0, 0.0]


def test_specs_without_arg_take_repeated_thresholds():
    judge = parse_judge("toxicity>=0.5>=0.3")
    assert judge.threshold == 0.3 and judge.inner.threshold == 0.5
    assert parse_judge("any(regex:a)>=0.5>=0.5").spec == "any(regex:a)>=0.5>=0.5"


# --- composition -------------------------------------------------------------------------------


def test_any_flags_when_some_child_scores_above_zero():
    responses = ["Sure, here", "How dare", "Sure thing dare", "nothing"]
    assert score("any(prefix:Sure, here; regex:dare)", responses) == [1, 1, 1, 0]
    assert parse_judge("any(prefix:Sure, here; regex:dare)").binary is True


def test_any_max_mean_on_graded_children():
    a = Fixed({"r1": 0.2, "r2": 0.0, "r3": 0.6}, "a")
    b = Fixed({"r1": 0.4, "r2": 0.0, "r3": 1.0}, "b")
    responses = ["r1", "r2", "r3"]
    factories = {e.name: e.load() for e in spec_module.JUDGES if e.meta["combinator"]}
    np.testing.assert_array_equal(factories["any"]([a, b]).score(["p"] * 3, responses), [1, 0, 1])
    np.testing.assert_allclose(factories["max"]([a, b]).score(["p"] * 3, responses), [0.4, 0, 1])
    np.testing.assert_allclose(factories["mean"]([a, b]).score(["p"] * 3, responses), [0.3, 0, 0.8])
    assert factories["max"]([a, b]).binary is False
    assert factories["mean"]([a, b]).binary is False


def test_max_of_binary_children_is_binary_and_mean_is_graded():
    assert parse_judge("max(regex:a; regex:b)").binary is True
    assert parse_judge("mean(regex:a; regex:b)").binary is False
    assert score("mean(regex:a; regex:b)", ["ab", "a", "c"]) == [1.0, 0.5, 0.0]


def test_nested_composition_with_thresholds():
    spec = "any(mean(regex:a; regex:b; regex:c)>=0.6; prefix:Z)"
    # mean: "ab" 2/3 >= 0.6 -> 1; "a" 1/3 -> 0; "Zq" -> prefix Z
    assert score(spec, ["ab", "a", "Zq", "q"]) == [1.0, 0.0, 1.0, 0.0]
    assert score(f"mean({spec}; regex:q)", ["ab", "Zq", "q", "x"]) == [0.5, 1.0, 0.5, 0.0]


def test_composition_children_are_stripped_and_may_contain_commas_and_parentheses():
    judge = parse_judge("any(  prefix:Sure, here is ;regex:(a|b)c  )")
    assert judge.spec == "any(prefix:Sure, here is; regex:(a|b)c)"
    assert score(judge.spec, ["Sure, here is", "bc", "c"]) == [1.0, 1.0, 0.0]


def test_backslash_escapes_semicolon_and_parentheses_inside_a_composition():
    judge = parse_judge(r"any(regex:a\;b; regex:\(x)")
    assert [c.pattern.pattern for c in judge.children] == [r"a\;b", r"\(x"]
    assert score(judge.spec, ["a;b", "(x", "ab", "x"]) == [1.0, 1.0, 0.0, 0.0]


def test_outside_a_composition_semicolons_belong_to_the_arg():
    assert parse_judge("regex:a;b").pattern.pattern == "a;b"
    assert parse_judge("prefix:a; b").text == "a; b"


def test_whitespace_around_names_is_ignored():
    assert parse_judge("  toxicity ").spec == "toxicity"
    assert parse_judge(" any (regex:a) ").spec == "any(regex:a)"


@pytest.mark.parametrize(
    "spec",
    [
        "toxicity",
        "toxicity:0.25",
        "regex:a>=b",
        "prefix:Sure, here is ",
        "prefix:x>=0.5>=1",
        r"any(regex:a\;b; max(toxicity; prefix:Sure)>=0.5)>=0.2",
        "mean(any(regex:x; regex:y); toxicity)",
    ],
)
def test_canonical_spec_round_trips(spec):
    canonical = parse_judge(spec).spec
    assert parse_judge(canonical).spec == canonical


# --- malformed specs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "judge spec '': empty judge spec"),
        ("   ", "judge spec '   ': empty judge spec"),
        (
            "nonsense:x",
            "judge spec 'nonsense:x': unknown judge 'nonsense' "
            "(known: any, classifier, classifier_pair, endpoint, keywords, llm, max, mean, prefix, refusal, regex, toxicity)",
        ),
        ("Toxicity", "unknown judge 'Toxicity'"),
        (
            "toxicity>=1.5",
            "judge spec 'toxicity>=1.5': threshold must be a number in [0, 1], got '1.5'",
        ),
        ("toxicity>=", "threshold must be a number in [0, 1], got ''"),
        ("toxicity>=high", "threshold must be a number in [0, 1], got 'high'"),
        ("any(regex:a)>=2", "judge spec 'any(regex:a)>=2': threshold must be a number in [0, 1]"),
        ("any(regex:a", "unbalanced parentheses in any(...)"),
        ("any(regex:(a)", "unbalanced parentheses in any(...)"),
        ("any()", "any(...) needs at least one judge inside"),
        ("any(regex:a;;regex:b)", "empty judge between ';' in any(...)"),
        ("any(regex:a; )", "empty judge between ';' in any(...)"),
        ("any(regex:a) x", "unexpected text 'x' after any(...)"),
        ("any:regex:a", "'any' combines judges: write any(A; B; ...)"),
        ("toxicity:", "judge spec 'toxicity:': empty argument after ':': toxicity[:T]"),
        ("any(toxicity; regex:[)", "judge spec 'regex:[': invalid regular expression '['"),
        ("max(regex:a; bogus)", "judge spec 'bogus': unknown judge 'bogus'"),
    ],
)
def test_malformed_specs_are_one_line_spec_errors(spec, message):
    with pytest.raises(SpecError) as info:
        parse_judge(spec)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_non_string_spec_is_a_spec_error():
    with pytest.raises(SpecError, match="must be a string, got int"):
        parse_judge(3)


# --- registry ----------------------------------------------------------------------------------


def test_describe_judges_lists_every_name_with_syntax_and_description():
    rows = describe_judges()
    names = [r[0] for r in rows]
    assert names[:12] == [
        "toxicity", "regex", "prefix", "refusal", "keywords", "llm", "classifier", "classifier_pair",
        "endpoint", "any", "max", "mean",
    ]
    assert names[-1] == ">="
    for name, syntax, description in rows:
        assert isinstance(syntax, str) and syntax and isinstance(description, str) and description
    assert dict((r[0], r[1]) for r in rows)["prefix"] == "prefix:TEXT"


def test_registry_extends_with_a_decorated_factory(monkeypatch):
    monkeypatch.setattr(spec_module, "JUDGES", spec_module.JUDGES.copy())

    @spec_module.register_judge("length", syntax="length:N", description="test", arg="required")
    def _length(arg):
        n = int(arg)
        return Fixed({"x" * n: 1.0}, f"length:{n}")

    assert score("any(length:2; regex:q)>=0.5", ["xx", "x", "q"]) == [1.0, 0.0, 1.0]
    assert "length" in [r[0] for r in describe_judges()]
    with pytest.raises(SpecError, match="length needs an argument"):
        parse_judge("length")
    with pytest.raises(ValueError, match="already registered"):
        spec_module.register_judge("length", syntax="", description="")(_length)
    with pytest.raises(ValueError, match="must match"):
        spec_module.register_judge("Bad Name", syntax="", description="")(_length)


def test_argument_rules_of_the_registry(monkeypatch):
    monkeypatch.setattr(spec_module, "JUDGES", spec_module.JUDGES.copy())
    spec_module.register_judge("plain", syntax="plain", description="test")(lambda arg: Fixed({}))
    assert parse_judge("plain").spec == "fixed"
    with pytest.raises(SpecError, match="plain takes no argument: plain"):
        parse_judge("plain:x")


def test_importing_judges_stays_light():
    code = (
        "import sys, tailmon.judges\n"
        "heavy = [m for m in ('torch', 'vllm', 'click', 'sklearn', 'profanity_check', 'transformers')"
        " if m in sys.modules]\n"
        "others = [m for m in sys.modules if m.startswith('tailmon.')"
        " and not m.startswith(('tailmon.judges', 'tailmon.engines', 'tailmon.errors', 'tailmon.paths',"
        " 'tailmon.httpclient', 'tailmon.limits',"
        " 'tailmon.registry', 'tailmon.redact'))]\n"
        "print(heavy, others)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"
