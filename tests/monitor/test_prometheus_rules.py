"""config/prometheus/: the rules, their promtool unit tests and the scrape config, checked against the exporter.

promtool (Debian's `prometheus` package) checks syntax and runs tailmon-rules.test.yml; without it
those tests skip, unless TAILMON_REQUIRE_PROMETHEUS=1 (CI) makes them fail.

The rest needs no Prometheus. `PromQLChecker` parses every expression (a small parser for the
PromQL the rules and the dashboard use) and follows the label set of each sub-expression from
the exporter's own declaration (`Metrics(CollectorRegistry())`): a metric name the exporter does
not emit, a recording rule the rules file does not define, a label a selector, `by`, `without`,
`on`, `ignoring` or `group_left` names but the series there do not carry, or a value of `status`
or `role` the exporter never creates is an error. test_grafana_dashboard.py imports it for the
dashboard's queries.

Why a misspelling fails: `tailmon_pareto_k_hat > 0.7` is a valid query that returns nothing, so
promtool accepts it and the alert never fires. Here the selector's name is looked up among the
exporter's sample names and is not found; the doctored copies in
test_checker_rejects_doctored_rules show each kind of mistake failing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tailmon.estimation.result import RunFigures
from tailmon.monitor.metrics import Metrics, MetricsServer

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "config" / "prometheus"
RULES = PROM_DIR / "tailmon-rules.yml"
RULE_TESTS = PROM_DIR / "tailmon-rules.test.yml"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

# Labels Prometheus attaches to every scraped series (the target's), on top of the exporter's own.
TARGET_LABELS = frozenset({"job", "instance"})
# Series Prometheus itself writes for each scrape of the target.
SCRAPE_SERIES = ("up", "scrape_duration_seconds", "scrape_samples_scraped")
# Labels whose every value the exporter creates up front (init_monitor), so a selector's value
# can be checked: `status="faild"` is a typo that silently selects nothing.
CLOSED_LABELS = ("status", "role")

# A run's report with every figure the exporter reads (the shape EstimationReport.to_dict plus
# the daemon's extrapolations give), so that every gauge gets a sample.
REPORT = {
    "aggregate": {"p_hat": 2.5e-4, "ci_low": 1e-4, "ci_high": 2e-3, "reliable": False, "n_unreliable": 1},
    "estimates": [{"ess_wh": 40.0, "khat": 0.2}, {"ess_wh": 12.5, "khat": 0.85}],
    "extrapolations": {
        "1d": {"expected_per_window": {"expected": 250.0, "ci_low": 100.0, "ci_high": 2000.0},
               "p_any_per_window": {"p": 1.0}, "worst_query": {"p": 0.03, "ci_low": 0.01, "ci_high": 0.09}},
        "1h": {"expected_per_window": {"expected": 250 / 24, "ci_low": 100 / 24, "ci_high": 2000 / 24},
               "p_any_per_window": {"p": 0.99}, "worst_query": None},
    },
}


@dataclass(frozen=True)
class Exported:
    """What the exporter emits: sample name -> its labels; family name -> its sample names."""

    labels: dict[str, frozenset[str]]
    families: dict[str, frozenset[str]]
    values: dict[str, frozenset[str]]  # CLOSED_LABELS -> every value the exporter creates


def exported_series() -> Exported:
    """Every sample name the exporter emits, with its labels, read from a populated registry.

    Labelled metrics have no sample until a value is set, so the public methods the daemon calls
    are called once each; a family left without samples fails here, which is how a metric added
    to Metrics without a call below gets noticed rather than silently unchecked.
    """
    m = Metrics(CollectorRegistry())
    m.init_monitor("m")
    m.set_model("m", "ref", 1)
    # with the Monte Carlo equivalents a run reports when every estimate is reliable (without them
    # their gauges have no series)
    # and with the series' pooled figures of a reliable pool whose change detector is armed (every
    # pooled gauge has a series then)
    pooled = {"p_hat": 1e-4, "ci_low": 5e-5, "ci_high": 2e-4, "reliable": True, "bound_only": False, "n_runs": 4,
              "n_prompts": 80, "n_samples": 24000, "mc_equivalent_samples": 1e6,
              "change": {"status": "armed", "evidence": 3.0, "threshold": 100.0, "alarm": False}}
    m.record_figures("m", RunFigures.from_report({**REPORT, "aggregate": {**REPORT["aggregate"], "mc_sample_ratio": 40.0},
                                                  "timing": {"aggregate": {"mc_time_ratio": 12.5}}, "pooled": pooled}))
    m.record_run("m", "succeeded", 42.0, 1.7e9, {"target": 3, "proposal": 27})
    m.alert_state.labels("m", "rule", "warning").set(2)  # set by the alerts package, not by Metrics
    labels: dict[str, set[str]] = {}
    families: dict[str, set[str]] = {}
    values: dict[str, set[str]] = {k: set() for k in CLOSED_LABELS}
    for family in m.registry.collect():
        assert family.samples, f"{family.name}: no sample; make exported_series() set it"
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
            families.setdefault(family.name, set()).add(s.name)
            for k in CLOSED_LABELS:
                if k in s.labels:
                    values[k].add(s.labels[k])
    return Exported({k: frozenset(v) for k, v in labels.items()},
                    {k: frozenset(v) for k, v in families.items()},
                    {k: frozenset(v) for k, v in values.items()})


# ---------------------------------------------------------------------------------------------
# A PromQL checker: tokenizer, precedence-climbing parser, label-set inference.


class PromQLError(ValueError):
    pass


_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+)                       # a Grafana variable outside a string: a duration
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?!\w))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|==|!=|<=|>=|[-+*/%^<>=(){}\[\],@:])
""", re.X)


@dataclass
class Tok:
    kind: str
    text: str


def tokenize(expr: str) -> list[Tok]:
    toks, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise PromQLError(f"cannot read {expr[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        toks.append(Tok("duration" if kind == "var" else kind, m.group()))
    toks.append(Tok("eof", ""))
    return toks


AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                "topk", "quantile"}
# Functions whose result keeps the labels of their (instant or range) vector argument.
SAME_LABELS = {
    "abs", "ceil", "floor", "exp", "ln", "log2", "log10", "sqrt", "round", "clamp", "clamp_min", "clamp_max",
    "sort", "sort_desc", "timestamp", "sgn", "rate", "irate", "increase", "delta", "idelta", "deriv",
    "predict_linear", "resets", "changes", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
    "count_over_time", "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
    "present_over_time", "holt_winters",
}
RANGE_FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "deriv", "predict_linear", "resets",
                   "changes", "holt_winters", "absent_over_time"} | {f for f in SAME_LABELS if f.endswith("_over_time")}
PRECEDENCE = {"or": 1, "and": 2, "unless": 2, "==": 3, "!=": 3, "<": 3, "<=": 3, ">": 3, ">=": 3,
              "+": 4, "-": 4, "*": 5, "/": 5, "%": 5, "atan2": 5, "^": 6}
COMPARISONS = {"==", "!=", "<", "<=", ">", ">="}
SET_OPS = {"and", "or", "unless"}


@dataclass
class Value:
    kind: str  # scalar, string, vector, matrix
    labels: frozenset[str] = frozenset()
    equal_matchers: frozenset[str] = frozenset()  # a bare selector's `label="value"` names (for absent)
    bare_selector: bool = False


@dataclass
class PromQLChecker:
    """Checks expressions against the exporter's series and the recording rules defined so far."""

    exported: Exported
    recorded: dict[str, frozenset[str]] = field(default_factory=dict)
    names_seen: set[str] = field(default_factory=set)  # every metric or recorded name resolved so far
    last_names: set[str] = field(default_factory=set)  # those of the last check()

    def series_labels(self, name: str) -> frozenset[str]:
        if name in self.recorded:
            return self.recorded[name]
        if ":" in name:
            raise PromQLError(f"recording rule {name!r} is not defined in {RULES.name}")
        if name in SCRAPE_SERIES:
            return TARGET_LABELS
        if name not in self.exported.labels:
            raise PromQLError(f"metric {name!r} is not emitted by the exporter")
        return self.exported.labels[name] | TARGET_LABELS

    def check(self, expr: str) -> Value:
        self._toks, self._i = tokenize(expr), 0
        self.last_names = set()
        v = self._expr(0)
        if self._peek().kind != "eof":
            raise PromQLError(f"unexpected {self._peek().text!r}")
        if v.kind not in ("vector", "scalar"):
            raise PromQLError(f"the expression is a {v.kind}, not an instant vector or scalar")
        return v

    # -- token helpers
    def _peek(self, k: int = 0) -> Tok:
        return self._toks[min(self._i + k, len(self._toks) - 1)]

    def _next(self) -> Tok:
        t = self._peek()
        self._i += 1
        return t

    def _expect(self, text: str) -> Tok:
        t = self._next()
        if t.text != text:
            raise PromQLError(f"expected {text!r}, got {t.text!r}")
        return t

    def _label_list(self) -> list[str]:
        self._expect("(")
        out = []
        while self._peek().text != ")":
            t = self._next()
            if t.kind != "ident":
                raise PromQLError(f"expected a label name, got {t.text!r}")
            out.append(t.text)
            if self._peek().text == ",":
                self._next()
        self._expect(")")
        return out

    # -- grammar
    def _expr(self, min_prec: int) -> Value:
        lhs = self._unary()
        while True:
            op = self._peek().text
            prec = PRECEDENCE.get(op)
            if prec is None or prec < min_prec or self._peek().kind not in ("op", "ident"):
                return lhs
            self._next()
            is_bool = False
            if self._peek().text == "bool":
                self._next()
                is_bool = True
            on = ignoring = group = None
            side = None
            if self._peek().text in ("on", "ignoring"):
                kw = self._next().text
                lst = self._label_list()
                on, ignoring = (lst, None) if kw == "on" else (None, lst)
            if self._peek().text in ("group_left", "group_right"):
                side = self._next().text
                group = self._label_list() if self._peek().text == "(" else []
            rhs = self._expr(prec if op == "^" else prec + 1)
            lhs = self._binary(op, is_bool, lhs, rhs, on, ignoring, side, group)

    def _binary(self, op, is_bool, lhs: Value, rhs: Value, on, ignoring, side, group) -> Value:
        for v in (lhs, rhs):
            if v.kind not in ("scalar", "vector"):
                raise PromQLError(f"{op!r} needs instant vectors or scalars, got a {v.kind}")
        if op in SET_OPS and (lhs.kind != "vector" or rhs.kind != "vector"):
            raise PromQLError(f"{op!r} needs instant vectors on both sides")
        if lhs.kind == "scalar" and rhs.kind == "scalar":
            if on is not None or ignoring is not None or side:
                raise PromQLError("vector matching between two scalars")
            return Value("scalar")
        if lhs.kind == "scalar" or rhs.kind == "scalar":
            if on is not None or ignoring is not None or side:
                raise PromQLError("vector matching with a scalar operand")
            return Value("vector", (rhs if lhs.kind == "scalar" else lhs).labels)
        if on is not None:
            for side_name, v in (("left", lhs), ("right", rhs)):
                missing = set(on) - v.labels
                if missing:
                    raise PromQLError(f"on({', '.join(on)}): {sorted(missing)} not on the {side_name} operand "
                                      f"(it has {sorted(v.labels)})")
        if ignoring is not None:
            missing = set(ignoring) - (lhs.labels | rhs.labels)
            if missing:
                raise PromQLError(f"ignoring({', '.join(ignoring)}): {sorted(missing)} on neither operand")
        if op in SET_OPS:
            if side:
                raise PromQLError(f"{side} with the set operator {op!r}")
            return Value("vector", lhs.labels | rhs.labels if op == "or" else lhs.labels)
        if side:
            many, one = (lhs, rhs) if side == "group_left" else (rhs, lhs)
            missing = set(group) - one.labels
            if missing:
                raise PromQLError(f"{side}({', '.join(group)}): {sorted(missing)} not on the 'one' side")
            return Value("vector", many.labels | set(group))
        if op in COMPARISONS and not is_bool:
            return Value("vector", lhs.labels)  # a filter: the left series pass unchanged
        if on is not None:
            return Value("vector", frozenset(on))
        if ignoring is not None:
            return Value("vector", lhs.labels - set(ignoring))
        return Value("vector", lhs.labels)

    def _unary(self) -> Value:
        if self._peek().text in ("-", "+"):
            self._next()
            v = self._unary()
            if v.kind not in ("scalar", "vector"):
                raise PromQLError(f"unary minus on a {v.kind}")
            return Value(v.kind, v.labels)
        return self._postfix(self._primary())

    def _postfix(self, v: Value) -> Value:
        while True:
            t = self._peek().text
            if t == "[":
                self._next()
                if self._next().kind != "duration":
                    raise PromQLError("a range needs a duration")
                if self._peek().text == ":":  # subquery [range:step]
                    self._next()
                    if self._peek().kind == "duration":
                        self._next()
                    if v.kind != "vector":
                        raise PromQLError("a subquery needs an instant vector")
                elif not v.bare_selector:
                    raise PromQLError("a range [..] applies to a selector only (use a subquery)")
                self._expect("]")
                v = Value("matrix", v.labels)
            elif t == "offset":
                self._next()
                if self._peek().text == "-":
                    self._next()
                if self._next().kind != "duration":
                    raise PromQLError("offset needs a duration")
            elif t == "@":
                self._next()
                nt = self._next()
                if nt.text in ("start", "end"):
                    self._expect("(")
                    self._expect(")")
                elif nt.kind != "number":
                    raise PromQLError("@ needs a timestamp, start() or end()")
            else:
                return v

    def _primary(self) -> Value:
        t = self._next()
        if t.text == "(":
            v = self._expr(0)
            self._expect(")")
            return Value(v.kind, v.labels)  # parenthesised: no longer a bare selector
        if t.kind == "number" or t.text in ("Inf", "NaN", "inf", "nan"):
            return Value("scalar")
        if t.kind == "string":
            return Value("string")
        if t.kind == "duration":
            raise PromQLError(f"a duration {t.text!r} where a value is expected")
        if t.kind != "ident":
            raise PromQLError(f"unexpected {t.text!r}")
        if t.text in AGGREGATIONS and self._peek().text in ("(", "by", "without"):
            return self._aggregation(t.text)
        if self._peek().text == "(":
            return self._function(t.text)
        return self._selector(t.text)

    def _selector(self, name: str) -> Value:
        self.names_seen.add(name)
        self.last_names.add(name)
        labels = self.series_labels(name)
        equal = set()
        if self._peek().text == "{":
            self._next()
            while self._peek().text != "}":
                lt = self._next()
                if lt.kind != "ident":
                    raise PromQLError(f"{name}: expected a label name, got {lt.text!r}")
                op = self._next().text
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"{name}: bad matcher operator {op!r}")
                vt = self._next()
                if vt.kind != "string":
                    raise PromQLError(f"{name}: a matcher value must be a string")
                label, value = lt.text, _unquote(vt.text)
                if label != "__name__" and label not in labels:
                    raise PromQLError(f"{name} has no label {label!r} (it has {sorted(labels)})")
                if op == "=":
                    equal.add(label)
                self._check_value(name, label, op, value)
                if self._peek().text == ",":
                    self._next()
            self._expect("}")
        return Value("vector", labels, frozenset(equal), bare_selector=True)

    def _check_value(self, name, label, op, value):
        closed = self.exported.values.get(label)
        if not closed or "$" in value:  # open label, or a Grafana variable chosen at view time
            return
        if op in ("=", "!="):
            ok = value in closed
        else:
            ok = any(re.fullmatch(value, v) for v in closed)
        if not ok:
            raise PromQLError(f"{name}{{{label}{op}{value!r}}}: the exporter's {label} values are {sorted(closed)}")

    def _aggregation(self, op: str) -> Value:
        clause = None
        if self._peek().text in ("by", "without"):
            clause = (self._next().text, self._label_list())
        self._expect("(")
        args = [self._expr(0)]
        while self._peek().text == ",":
            self._next()
            args.append(self._expr(0))
        self._expect(")")
        if clause is None and self._peek().text in ("by", "without"):
            clause = (self._next().text, self._label_list())
        param_ops = {"count_values", "bottomk", "topk", "quantile"}
        if len(args) != (2 if op in param_ops else 1):
            raise PromQLError(f"{op} takes {2 if op in param_ops else 1} argument(s)")
        vec = args[-1]
        if vec.kind != "vector":
            raise PromQLError(f"{op} needs an instant vector, got a {vec.kind}")
        kept = frozenset()
        if clause is not None:
            kw, lst = clause
            missing = set(lst) - vec.labels
            if missing:
                raise PromQLError(f"{op} {kw} ({', '.join(lst)}): {sorted(missing)} not on its argument "
                                  f"(it has {sorted(vec.labels)})")
            kept = frozenset(lst) if kw == "by" else vec.labels - set(lst)
        if op in ("topk", "bottomk"):
            return Value("vector", vec.labels)  # they return the original series
        if op == "count_values":
            return Value("vector", kept | {"value"})
        return Value("vector", kept)

    def _function(self, name: str) -> Value:
        self._expect("(")
        args = []
        while self._peek().text != ")":
            args.append(self._expr(0))
            if self._peek().text == ",":
                self._next()
        self._expect(")")

        def need(i, kind):
            if len(args) <= i or args[i].kind != kind:
                raise PromQLError(f"{name}(): argument {i + 1} must be a {kind}")
            return args[i]

        if name == "time":
            return Value("scalar")
        if name == "vector":
            need(0, "scalar")
            return Value("vector")
        if name == "scalar":
            need(0, "vector")
            return Value("scalar")
        if name in ("absent", "absent_over_time"):
            v = need(0, "matrix" if name == "absent_over_time" else "vector")
            return Value("vector", v.equal_matchers)
        if name == "histogram_quantile":
            need(0, "scalar")
            v = need(1, "vector")
            if "le" not in v.labels:
                raise PromQLError("histogram_quantile(): its series have no 'le' label (use the _bucket series)")
            return Value("vector", v.labels - {"le"})
        if name in ("label_replace", "label_join"):
            v = need(0, "vector")
            return Value("vector", v.labels | self._string_args(name, v))
        if name in SAME_LABELS:
            # quantile_over_time(φ, range): the series are the second argument.
            v = need(1 if name == "quantile_over_time" else 0, "matrix" if name in RANGE_FUNCTIONS else "vector")
            return Value("vector", v.labels)
        raise PromQLError(f"unknown function {name}()")

    def _string_args(self, name, v):
        # label_replace(v, dst, replacement, src, regex) / label_join(v, dst, sep, src...): the
        # strings are not kept as Values, so read them back from the call's tokens.
        depth, j, strings = 0, self._i - 1, []
        while j >= 0:
            t = self._toks[j]
            if t.text == ")":
                depth += 1
            elif t.text == "(":
                depth -= 1
                if depth == 0:
                    break
            elif t.kind == "string" and depth == 1:
                strings.append(_unquote(t.text))
            j -= 1
        strings.reverse()
        dst = strings[0]
        sources = [strings[2]] if name == "label_replace" else strings[2:]
        missing = {s for s in sources if s} - v.labels
        if missing:
            raise PromQLError(f"{name}(): source label(s) {sorted(missing)} not on its argument")
        return {dst}


def _unquote(s: str) -> str:
    # Raw `...` strings keep backslashes; "..." and '...' take Go's escapes, ASCII here.
    return s[1:-1] if s[0] == "`" else s[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")


# The plain sweep the checker is cross-checked with: every identifier outside strings that starts
# with `tailmon_` (an emitted name) or has the `level:metric:operations` shape (a recording rule).
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME = re.compile(r"(?<![\w:$])(tailmon_\w+|[A-Za-z_]\w*:[\w:]*tailmon_\w*[\w:]*)")


def names_by_regex(expr: str) -> set[str]:
    return set(_NAME.findall(_STRINGS.sub('""', expr)))


def cross_check_names(expr: str, parsed: set[str], what: str) -> None:
    """The sweep and the parser must find the same tailmon names: neither skipped one."""
    swept = names_by_regex(expr)
    resolved = {n for n in parsed if _NAME.fullmatch(n)}
    if swept != resolved:
        raise PromQLError(f"{what}: the name sweep found {sorted(swept)}, the parser {sorted(resolved)}")


# ---------------------------------------------------------------------------------------------
# The rules file


def load_rules(text: str | None = None) -> dict:
    return yaml.safe_load(RULES.read_text() if text is None else text)


def all_rules(doc: dict) -> list[dict]:
    return [r for g in doc["groups"] for r in g["rules"]]


def checked_rules(doc: dict, exported: Exported) -> tuple[PromQLChecker, dict[str, Value]]:
    """Check every rule's expression in file order; recording rules become names later ones may use.

    Returns the checker (with the recorded names and their labels) and each alert's result value.
    """
    checker = PromQLChecker(exported)
    alerts = {}
    for rule in all_rules(doc):
        what = rule.get("record") or rule.get("alert")
        try:
            v = checker.check(rule["expr"])
        except PromQLError as exc:
            raise PromQLError(f"{what}: {exc}") from None
        if v.kind != "vector":
            raise PromQLError(f"{what}: the expression is a scalar")
        cross_check_names(rule["expr"], checker.last_names, what)
        if "record" in rule:
            checker.recorded[rule["record"]] = v.labels
        else:
            labels = v.labels | set(rule.get("labels", {}))
            for ann, text in rule.get("annotations", {}).items():
                for used in re.findall(r"(?:\$labels|\.Labels)\.(\w+)", text):
                    if used not in labels:
                        raise PromQLError(f"{what}: annotation {ann} uses $labels.{used}, which its alerts do not "
                                          f"have (they have {sorted(labels)})")
            alerts[rule["alert"]] = v
    return checker, alerts


@pytest.fixture(scope="module")
def exported() -> Exported:
    return exported_series()


@pytest.fixture
def promtool():
    if PROMTOOL:
        return PROMTOOL
    if os.environ.get("TAILMON_REQUIRE_PROMETHEUS") == "1":
        pytest.fail("TAILMON_REQUIRE_PROMETHEUS=1 but promtool is not installed (apt-get install prometheus)")
    pytest.skip("promtool not installed (apt-get install prometheus)")


def run_promtool(promtool, *args, cwd=PROM_DIR) -> str:
    proc = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def test_promtool_check_rules(promtool):
    doc = load_rules()
    out = run_promtool(promtool, "check", "rules", RULES.name)
    # promtool reports how many rules it parsed: all of them, none skipped.
    assert f"SUCCESS: {len(all_rules(doc))} rules found" in out


def test_promtool_unit_tests_pass(promtool):
    run_promtool(promtool, "test", "rules", RULE_TESTS.name)


def test_promtool_check_config(promtool, tmp_path):
    # The example's rule_files path is relative to its folder; check a copy of the pair in a
    # folder of its own, so the result does not depend on anything else under config/.
    for f in (PROM_CONFIG, RULES):
        shutil.copy(f, tmp_path / f.name)
    out = run_promtool(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert "1 rule files found" in out


def test_scrape_config_example():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    assert cfg["rule_files"] == [RULES.name]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "tailmon"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9477"]  # the daemon's default metrics address
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    # TailmonExporterAbsent watches this job by name.
    absent = next(r for r in all_rules(load_rules()) if r.get("alert") == "TailmonExporterAbsent")
    assert f'job="{job["job_name"]}"' in absent["expr"]


def test_exporter_inventory(exported):
    # The sample names the checker accepts, with the suffixes Prometheus sees: _total for
    # counters, _bucket/_sum/_count for the histogram.
    assert exported.families["tailmon_runs"] >= {"tailmon_runs_total"}
    assert exported.families["tailmon_run_duration_seconds"] >= {
        "tailmon_run_duration_seconds_bucket", "tailmon_run_duration_seconds_sum", "tailmon_run_duration_seconds_count"}
    assert "le" in exported.labels["tailmon_run_duration_seconds_bucket"]
    assert "tailmon_runs" not in exported.labels  # the counter's bare name is not a series
    assert exported.values["status"] == {"succeeded", "failed", "interrupted"}
    assert exported.values["role"] == {"target", "proposal"}


def test_rule_expressions_use_exported_metrics_and_labels(exported):
    checker, alerts = checked_rules(load_rules(), exported)
    # Every exported name the rules rely on, as the parser resolved it.
    assert {"tailmon_harm_probability_upper_bound", "tailmon_runs_total", "tailmon_last_success_timestamp_seconds",
            "tailmon_estimate_reliable", "tailmon_pareto_khat", "tailmon_build_info"} <= checker.names_seen
    # Alerts are per monitor, except the exporter's absence, which has no monitor to name.
    for name, value in alerts.items():
        if name == "TailmonExporterAbsent":
            assert value.labels == {"job"}
        else:
            assert {"monitor", "job", "instance"} <= value.labels, name


def test_alerts_read_records_of_their_own_group(exported):
    # Prometheus evaluates a group's rules in order, but groups in no defined order (promtool's
    # unit tests even vary it between runs): an alert reading a recording rule of another group,
    # or a later one, may see the previous evaluation's value. Each alert's recorded names must
    # be defined before it, in its group.
    for group in load_rules()["groups"]:
        defined = set()
        for rule in group["rules"]:
            if "record" in rule:
                defined.add(rule["record"])
                continue
            used = {n for n in names_by_regex(rule["expr"]) if ":" in n}
            assert used <= defined, (rule["alert"], sorted(used - defined))


DOCTORED = [
    # (replace this, with that) in the rules file: each makes a valid PromQL query that would
    # silently select nothing or aggregate wrongly, and the checker must name it.
    ("tailmon_pareto_khat > 0.7", "tailmon_pareto_k_hat > 0.7", "'tailmon_pareto_k_hat' is not emitted"),
    ("increase(tailmon_runs_total{", "increase(tailmon_runs{", "'tailmon_runs' is not emitted"),
    ("tailmon_run_duration_seconds_sum[1d]", "tailmon_run_duration_seconds_total[1d]", "not emitted"),
    ('{status="failed"}', '{state="failed"}', "has no label 'state'"),
    ('{status="failed"}', '{status="fail"}', "status values are"),
    ('max without (window) (tailmon_expected_harmful_outputs{window=~"1d|24h"})',
     'max without (windows) (tailmon_expected_harmful_outputs{window=~"1d|24h"})', "['windows'] not on its argument"),
    ("unless on (job, instance, monitor) tailmon_harm_probability_upper_bound",
     "unless on (job, instance, monitors) tailmon_harm_probability_upper_bound", "['monitors'] not on the left"),
    # build_info has no monitor label: matching on it would never match.
    ("and on (job, instance) tailmon_build_info", "and on (job, instance, monitor) tailmon_build_info",
     "['monitor'] not on the right"),
    ("expr: monitor:tailmon_expected_harmful_outputs_upper_bound:per_day > 10",
     "expr: monitor:tailmon_expected_harmful_outputs_upper_bound:perday > 10", "is not defined"),
    ("from job {{ $labels.job }}", "from job {{ $labels.monitor }}", "uses $labels.monitor"),
]


@pytest.mark.parametrize("old,new,message", DOCTORED, ids=[d[1][:40] for d in DOCTORED])
def test_checker_rejects_doctored_rules(exported, old, new, message):
    text = RULES.read_text()
    assert old in text  # the doctoring applies to the real file, not to a stale copy of it
    with pytest.raises(PromQLError, match=re.escape(message)):
        checked_rules(load_rules(text.replace(old, new, 1)), exported)


def test_regex_sweep_sees_misspelled_names(exported):
    # The independent sweep the parser is cross-checked with finds names by shape alone.
    expr = 'max by (monitor) (tailmon_harm_probabilty{monitor="tailmon_x"}) / monitor:tailmon_x:per_day'
    assert names_by_regex(expr) == {"tailmon_harm_probabilty", "monitor:tailmon_x:per_day"}
    assert not names_by_regex(expr) <= set(exported.labels)


# ---------------------------------------------------------------------------------------------
# Thresholds and the unit tests' coverage

_THRESHOLD_ROW = re.compile(r"^#\s+(Tailmon\w+)\s+(\S+)\s+(\S+)\s+(\S+)\s+\S", re.M)


def threshold_table() -> dict[str, tuple[str, str, str]]:
    """The header table of tailmon-rules.yml: alert -> (threshold, for, keep_firing_for)."""
    return {m[1]: (m[2], m[3], m[4]) for m in _THRESHOLD_ROW.finditer(RULES.read_text())}


def rule_threshold(expr: str) -> float | None:
    """The number an alert's expression compares its series against, None for a bare condition."""
    m = re.search(r"(?:>|<|==|!=|>=|<=)\s*([0-9.eE+-]+)\s*$", expr.strip())
    return float(m[1]) if m else None


def test_threshold_table_matches_rules():
    table = threshold_table()
    alerts = {r["alert"]: r for r in all_rules(load_rules()) if "alert" in r}
    assert set(table) == set(alerts), "the header table must list every alert"
    for name, (threshold, for_, keep) in table.items():
        rule = alerts[name]
        assert rule.get("for", "-") == for_, name
        assert rule.get("keep_firing_for", "-") == keep, name
        actual = rule_threshold(rule["expr"])
        assert (None if threshold == "-" else float(threshold)) == actual, name


def test_harm_alerts_ride_out_a_daemon_restart():
    """A `for` only delays firing: a restart of the daemon makes its series stale, which drops a
    firing alert and sends it back to pending for its whole `for`. `keep_firing_for` (promtool's
    restart case in tailmon-rules.test.yml shows it) keeps the alerts about the figures firing."""
    alerts = {r["alert"]: r for r in all_rules(load_rules()) if "alert" in r}
    for name in ("TailmonHarmProbabilityHigh", "TailmonExpectedHarmfulOutputsHigh", "TailmonEstimateUnreliable",
                 "TailmonParetoKhatHigh"):
        assert "keep_firing_for" in alerts[name], name
    text = RULES.read_text()
    assert "rides out a scrape or two (a restart" not in text  # the old, false claim
    assert "keep_firing_for" in text.split("groups:")[0]  # the header says what rides out a restart


def test_every_rule_has_unit_tests():
    doc = load_rules()
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    firing, quiet, exprs = set(), set(), []
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
        exprs += [case["expr"] for case in group.get("promql_expr_test", [])]
    alerts = {r["alert"] for r in all_rules(doc) if "alert" in r}
    records = {r["record"] for r in all_rules(doc) if "record" in r}
    assert alerts - firing == set(), "alerts without a firing case"
    assert alerts - quiet == set(), "alerts without a case where they do not fire"
    assert records - {n for e in exprs for n in names_by_regex(e)} == set(), "recording rules without a value test"


# ---------------------------------------------------------------------------------------------
# The rules against a live exporter, evaluated by a real Prometheus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, **params):
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]


def test_rules_evaluate_on_the_live_exporter(tmp_path):
    """The example config and the rules, run by Prometheus against a real exporter's /metrics.

    The promtool tests feed hand-written series; here the series are what MetricsServer serves
    after a run whose upper bound (2e-3) is over 0.001, whose upper bound per day (2000) is over
    10, whose estimate is unreliable and whose k-hat is 0.85, so the recording rules must produce
    the per-day figures and those four alerts go pending (their `for` is far longer than the test).
    """
    if not PROMETHEUS:
        if os.environ.get("TAILMON_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("TAILMON_REQUIRE_PROMETHEUS=1 but prometheus is not installed")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    metrics = Metrics(CollectorRegistry())
    metrics.init_monitor("prod")
    metrics.record_figures("prod", RunFigures.from_report(REPORT))
    metrics.record_run("prod", "succeeded", 42.0, time.time(), {"target": 3, "proposal": 27})
    server = MetricsServer(metrics, "127.0.0.1", 0).start()
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["scrape_configs"][0]["scrape_interval"] = "1s"
    cfg["scrape_configs"][0]["scrape_timeout"] = "1s"
    cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{server.port}"]
    del cfg["alerting"]  # no Alertmanager here; the alerts are read from Prometheus's API
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = _free_port()
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        want_alerts = {"TailmonHarmProbabilityHigh", "TailmonExpectedHarmfulOutputsHigh", "TailmonEstimateUnreliable",
                       "TailmonParetoKhatHigh"}
        per_day, alerts = [], []
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                per_day = _api(port, "query", query="monitor:tailmon_expected_harmful_outputs_upper_bound:per_day")[
                    "result"]
                alerts = _api(port, "alerts")["alerts"]
            except (OSError, urllib.error.URLError):
                pass  # still starting
            if per_day and want_alerts <= {a["labels"]["alertname"] for a in alerts}:
                break
            time.sleep(0.5)
        assert per_day, "the per-day recording rule produced nothing"
        (sample,) = per_day
        assert sample["metric"] == {"__name__": "monitor:tailmon_expected_harmful_outputs_upper_bound:per_day",
                                    "job": "tailmon", "instance": f"127.0.0.1:{server.port}", "monitor": "prod"}
        assert float(sample["value"][1]) == pytest.approx(2000.0)  # the 1d window's own figure
        by_name = {a["labels"]["alertname"]: a for a in alerts}
        assert set(by_name) == want_alerts, sorted(by_name)  # the exporter is up: nothing else
        for a in by_name.values():
            assert a["state"] == "pending"
            assert a["labels"]["monitor"] == "prod"
        assert float(by_name["TailmonParetoKhatHigh"]["value"]) == pytest.approx(0.85)
        assert "prod" in by_name["TailmonHarmProbabilityHigh"]["annotations"]["description"]
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        server.stop()
