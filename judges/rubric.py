"""LLM-judge rubrics: YAML data files read into validated `Rubric` objects.

A rubric asks a judge model one or more questions about a (prompt, response) pair, each answered
with a single digit, and says how the answers combine into a harm score in [0, 1]. The shipped
rubrics live in `tailmon/judges/rubrics/` (`shipped_rubrics()` lists them); `load_rubric(ref)`
takes a shipped name or a path to a `.yaml`/`.yml` file.

Schema (version 1)::

    version: 1                      # required, the schema version
    name: misuse                    # optional; default: the file name without extension
    description: One line for listings.
    system: You are a careful grader.   # optional system prompt of the judge model;
                                        # absent: the chat template's default
    min_digit_mass: 0.5             # optional, default 0.5, in (0, 1]
    questions:                      # 1 to 8; each is a separate judge-model query
      - id: refused                 # [a-z_][a-z0-9_]*, the name `score` uses
        template: |                 # the user message; {prompt} and {response} are replaced
          ...                       # ({response} is required, {prompt} optional)
        answer_prefix: "Answer: "   # the assistant turn starts with this; the digit comes next
        scale: [0, 1]               # lowest and highest answer digit, 0 <= low < high <= 9
    score: (1 - refused) * (convincing + specific) / 2   # required with several questions

How an answer is read: the template, with `{prompt}` and `{response}` substituted (literally, in
one pass, so braces elsewhere in the template and in the texts are left alone), is the user turn
of the judge model's chat template; the assistant turn starts with `answer_prefix`, and the
judge reads the model's next-token distribution there. Only the digits low..high count: their
probabilities are renormalised, and the question's value is (E[digit] - low) / (high - low), in
[0, 1]. The expectation, not the argmax, keeps the score graded and smooth in the model's belief.
Write `answer_prefix` so that the digit is the natural next token ("Answer: " or "Answer:"; the
judge tokenises prefix + digit and takes the common part as context, so either works whether a
tokenizer glues the space to the digit or not).

`min_digit_mass` documents what a well-formed answer is: when the scale's digits carry less than
this share of the next-token probability, the judge model wanted to say something else; the
answer still gets the renormalised digit expectation, and the judge counts it and reports it in
`Judge.warnings()` instead of hiding it.

`score` combines the questions' values (each in [0, 1]) with `+ - * /`, parentheses, numbers,
`min(a, b, ...)`, `max(a, b, ...)` and single comparisons `a < b`, `a <= b`, `a > b`, `a >= b`
(1.0 when true, else 0.0). It is checked on a grid over [0, 1] for every question when the rubric
is loaded, and must stay within [0, 1] there. With one question `score` defaults to its value.
Every question must appear in `score`: each costs a forward pass of the judge model.

0-100 scales (the misalignment literature's aligned/coherent/trait scores) are read as a 0-9
digit scale, value = E[digit] / 9, which is the 0-100 score divided by 100: "aligned < 50" is
`aligned < 0.5`. A 0-100 number would take two or three digit positions, and a next-token read
only sees the first; reading the second digit conditional on each first one costs ten more
positions and still has to guess where the number ends (`7` then stop, or `100`). One digit is
one forward pass, and small judge models follow it far more reliably.
"""

from __future__ import annotations

import ast
import itertools
import operator
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from tailmon.errors import InputError
from tailmon.limits import MAX_CONFIG_BYTES, read_limited

SCHEMA_VERSION = 1
DEFAULT_MIN_DIGIT_MASS = 0.5
# Each question is a forward pass per response, and the range check of `score` evaluates a grid
# of 5^questions points (390,625 at 8): more questions than this are a mistake, not a rubric.
MAX_QUESTIONS = 8
RUBRIC_SUFFIXES = (".yaml", ".yml")
_ID_RE = re.compile(r"[a-z_][a-z0-9_]*\Z")
_SHIPPED_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
_TOP_KEYS = {"version", "name", "description", "system", "min_digit_mass", "questions", "score"}
_QUESTION_KEYS = {"id", "template", "answer_prefix", "scale"}
_PLACEHOLDER_RE = re.compile(r"\{(prompt|response)\}")
# Grid points per question when checking that `score` stays in [0, 1]: the ends and the middle
# catch every product/sum of values and every comparison at 0.5; a few more catch the rest.
_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Question:
    """One judge-model query: the user message, the assistant's answer prefix, the digit scale."""

    id: str
    template: str
    answer_prefix: str
    low: int
    high: int

    @property
    def digits(self) -> tuple[str, ...]:
        return tuple(str(d) for d in range(self.low, self.high + 1))

    def render(self, prompt: str, response: str) -> str:
        """The user message for one pair: `{prompt}`, `{response}` replaced in a single pass."""
        values = {"prompt": prompt, "response": response}
        return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.template)

    def value(self, expected_digit: np.ndarray) -> np.ndarray:
        """Map E[digit] in [low, high] to [0, 1]."""
        return (np.asarray(expected_digit, dtype=np.float64) - self.low) / (self.high - self.low)


@dataclass(frozen=True)
class Rubric:
    """A validated rubric (see the module docstring for the file schema)."""

    name: str
    description: str
    questions: tuple[Question, ...]
    score_text: str
    system: str | None
    min_digit_mass: float
    source: str
    """Where it came from: the shipped name or the file path, for messages."""
    _combine: Callable[[Mapping[str, np.ndarray]], np.ndarray]

    def combine(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """The harm score from each question's values (arrays in [0, 1], one entry per pair)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            out = self._combine({k: np.asarray(v, dtype=np.float64) for k, v in values.items()})
        return np.asarray(out, dtype=np.float64) * np.ones_like(next(iter(values.values())))


# --------------------------------------------------------------------------------------------
# Finding rubric files


def _shipped_dir():
    return resources.files("tailmon.judges") / "rubrics"


def shipped_rubrics() -> list[str]:
    """Names of the rubrics shipped with tailmon (file names without extension), sorted."""
    folder = _shipped_dir()
    if not folder.is_dir():
        return []
    return sorted(
        p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith(RUBRIC_SUFFIXES)
    )


def _looks_like_path(ref: str) -> bool:
    return ref.endswith(RUBRIC_SUFFIXES) or "/" in ref or "\\" in ref or ref.startswith((".", "~"))


def load_rubric(ref: str) -> Rubric:
    """A shipped rubric by name (`misuse`) or a rubric file by path; `InputError` on any problem."""
    ref = ref.strip()
    if not ref:
        raise InputError("the rubric name is empty")
    if not _looks_like_path(ref) and _SHIPPED_NAME_RE.match(ref):
        for suffix in RUBRIC_SUFFIXES:
            candidate = _shipped_dir() / (ref + suffix)
            if candidate.is_file():
                return parse_rubric(candidate.read_text(encoding="utf-8"), ref, default_name=ref)
        shipped = ", ".join(shipped_rubrics()) or "none"
        raise InputError(
            f"unknown rubric {ref!r} (shipped: {shipped}; or give a path to a .yaml file)"
        )
    path = Path(ref).expanduser()
    try:
        # At most MAX_CONFIG_BYTES (README "Limits"): /dev/zero or a huge file fails in one line.
        text = read_limited(path, MAX_CONFIG_BYTES, f"rubric file {ref!r}").decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read rubric file {ref!r}: {exc}") from None
    return parse_rubric(text, ref, default_name=path.name.rsplit(".", 1)[0])


# --------------------------------------------------------------------------------------------
# Validation


def parse_rubric(text: str, source: str, default_name: str = "rubric") -> Rubric:
    """Validate rubric YAML text; `source` names it in errors."""
    import yaml  # only rubric users pay for it (tailmon.judges itself stays light)

    where = f"rubric {source!r}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{where}: not valid YAML: {_one_line(str(exc))}") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of fields at the top level")
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(_TOP_KEYS))})")
    version = data.get("version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise InputError(f"{where}: 'version' must be {SCHEMA_VERSION}, got {version!r}")
    name = _text_field(data, "name", where, default=default_name)
    description = _text_field(data, "description", where, default="")
    system = _text_field(data, "system", where, default=None)
    mass = data.get("min_digit_mass", DEFAULT_MIN_DIGIT_MASS)
    if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0 < mass <= 1:
        raise InputError(f"{where}: 'min_digit_mass' must be a number in (0, 1], got {mass!r}")

    raw_questions = data.get("questions")
    if not isinstance(raw_questions, list) or not raw_questions:
        raise InputError(f"{where}: 'questions' must be a non-empty list")
    if len(raw_questions) > MAX_QUESTIONS:
        raise InputError(f"{where}: at most {MAX_QUESTIONS} questions, got {len(raw_questions)}")
    questions: list[Question] = []
    for i, raw in enumerate(raw_questions, 1):
        question = _question(raw, f"{where}, question {i}")
        if question.id in {q.id for q in questions}:
            raise InputError(f"{where}: question id {question.id!r} is used twice")
        questions.append(question)
    ids = [q.id for q in questions]

    score = data.get("score")
    if score is None:
        if len(questions) > 1:
            raise InputError(f"{where}: 'score' is required with several questions "
                             f"(how {', '.join(ids)} combine)")
        score = ids[0]
    if not isinstance(score, str) or not score.strip():
        raise InputError(f"{where}: 'score' must be a non-empty expression string")
    score = " ".join(score.split())
    combine = compile_score(score, ids, where)
    return Rubric(name=name, description=description, questions=tuple(questions),
                  score_text=score, system=system, min_digit_mass=float(mass), source=source,
                  _combine=combine)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _text_field(data: dict, key: str, where: str, default):
    if key not in data:
        return default
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {key!r} must be a non-empty string")
    return value.strip()


def _question(raw: object, where: str) -> Question:
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a mapping with {', '.join(sorted(_QUESTION_KEYS))}")
    unknown = sorted(set(map(str, raw)) - _QUESTION_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(_QUESTION_KEYS))})")
    missing = sorted(_QUESTION_KEYS - set(raw))
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    qid = raw["id"]
    if not isinstance(qid, str) or not _ID_RE.match(qid) or qid in ("min", "max"):
        raise InputError(f"{where}: 'id' must match [a-z_][a-z0-9_]* (not min/max), got {qid!r}")
    where = f"{where} ({qid})"
    template = raw["template"]
    if not isinstance(template, str) or not template.strip():
        raise InputError(f"{where}: 'template' must be a non-empty string")
    if "{response}" not in template:
        raise InputError(f"{where}: 'template' must contain the placeholder {{response}}")
    prefix = raw["answer_prefix"]
    if not isinstance(prefix, str) or not prefix.strip():
        raise InputError(f"{where}: 'answer_prefix' must be a non-empty string")
    if prefix.rstrip()[-1:].isdigit():
        raise InputError(f"{where}: 'answer_prefix' must not end in a digit, got {prefix!r}")
    scale = raw["scale"]
    if (
        not isinstance(scale, list)
        or len(scale) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in scale)
        or not 0 <= scale[0] < scale[1] <= 9
    ):
        raise InputError(f"{where}: 'scale' must be [low, high], single digits with "
                         f"0 <= low < high <= 9, got {scale!r}")
    return Question(qid, template, prefix, scale[0], scale[1])


# --------------------------------------------------------------------------------------------
# The score expression: a small arithmetic language over the question values, vectorised


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv}
_COMPARE = {ast.Lt: np.less, ast.LtE: np.less_equal, ast.Gt: np.greater,
            ast.GtE: np.greater_equal}
_FUNCS = {"min": np.minimum, "max": np.maximum}

Env = Mapping[str, np.ndarray]


def compile_score(text: str, ids: list[str], where: str = "rubric") -> Callable[[Env], np.ndarray]:
    """Compile a `score` expression over question ids; checks names, syntax and the range."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise InputError(f"{where}: 'score' {text!r} is not a valid expression: {exc.msg}") from None
    used: set[str] = set()
    func = _compile_node(tree.body, set(ids), used, f"{where}: 'score' {text!r}")
    unused = [i for i in ids if i not in used]
    if unused:
        raise InputError(f"{where}: question(s) {', '.join(unused)} not used in 'score' {text!r}")
    grid = np.array(list(itertools.product(_GRID, repeat=len(ids))), dtype=np.float64).T
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(func(dict(zip(ids, grid))), dtype=np.float64) * np.ones(grid.shape[1])
    bad = ~((out >= 0.0) & (out <= 1.0))
    if bad.any():
        at = ", ".join(f"{i}={v:g}" for i, v in zip(ids, grid[:, np.flatnonzero(bad)[0]]))
        raise InputError(f"{where}: 'score' {text!r} leaves [0, 1] at {at} "
                         f"(gives {float(out[bad][0])!r})")
    return func


def _compile_node(node: ast.AST, ids: set[str], used: set[str], where: str):
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise InputError(f"{where}: only numbers are allowed as constants, got {node.value!r}")
        value = float(node.value)
        return lambda env: value
    if isinstance(node, ast.Name):
        if node.id not in ids:
            raise InputError(f"{where}: unknown name {node.id!r} (questions: {', '.join(sorted(ids))})")
        used.add(node.id)
        key = node.id
        return lambda env: env[key]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        op = _BINARY[type(node.op)]
        left = _compile_node(node.left, ids, used, where)
        right = _compile_node(node.right, ids, used, where)
        return lambda env: op(left(env), right(env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _compile_node(node.operand, ids, used, where)
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        return lambda env: sign * inner(env)
    if isinstance(node, ast.Compare):
        if len(node.ops) != 1 or type(node.ops[0]) not in _COMPARE:
            raise InputError(f"{where}: use one comparison at a time, with <, <=, > or >=")
        cmp = _COMPARE[type(node.ops[0])]
        left = _compile_node(node.left, ids, used, where)
        right = _compile_node(node.comparators[0], ids, used, where)
        return lambda env: cmp(left(env), right(env)).astype(np.float64)
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCS or node.keywords or len(node.args) < 2:
            raise InputError(f"{where}: the only functions are min(a, b, ...) and max(a, b, ...)")
        reduce = _FUNCS[name]
        args = [_compile_node(a, ids, used, where) for a in node.args]

        def call(env):
            out = args[0](env)
            for arg in args[1:]:
                out = reduce(out, arg(env))
            return out

        return call
    raise InputError(f"{where}: {type(node).__name__} is not allowed "
                     "(use numbers, question ids, + - * /, min, max, <, <=, >, >=)")
