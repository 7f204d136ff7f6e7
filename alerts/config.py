"""The configuration of alerting: each monitor's `alerts:` rules and the top-level `alert_sinks:`.

These are plain pydantic models; `tailmon.monitor.config` embeds them in its schema and checks the
references between them (sink names, windows) once the whole file is parsed, so that every
mistake is still one line naming the file and the key.
"""

from __future__ import annotations

import math
import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tailmon.errors import InputError
from tailmon.estimators import parse_window

BUILTIN_UNRELIABLE = "unreliable-estimate"
"""The rule every monitor has unless disabled: the aggregate estimate is not reliable."""
BUILTIN_RISK_INCREASE = "risk-increase"
"""The rule every monitor has unless disabled: the change detector raised an alarm."""
BUILTINS = (BUILTIN_UNRELIABLE, BUILTIN_RISK_INCREASE)

LOG_SINK = "log"
"""The log sink exists without being configured: alerts are never only in the database."""

# name -> (per window, description). Names are the exported metrics' without the `tailmon_`
# prefix, so a rule here and a Prometheus rule on the same figure read alike.
METRICS: dict[str, tuple[bool, str]] = {
    "harm_probability": (False, "the run's estimate of P(harmful answer) for one query"),
    "harm_probability_lower_bound": (False, "lower end of its interval"),
    "harm_probability_upper_bound": (False, "upper end of its interval"),
    "expected_harmful_outputs": (True, "expected harmful outputs per window"),
    "expected_harmful_outputs_upper_bound": (True, "upper bound of the expected harmful outputs per window"),
    "any_harmful_output_probability": (True, "P(at least one harmful output in the window)"),
    "worst_query_harm_probability": (True, "worst-query forecast for the window (absent when not fitted)"),
    "worst_query_harm_probability_upper_bound": (True, "upper end of the worst-query forecast's interval "
                                                       "(absent when not fitted)"),
    "effective_sample_size": (False, "smallest ESS of w*h over the run's prompts"),
    "pareto_khat": (False, "largest Pareto k-hat of the weights over the run's prompts"),
    "estimate_unreliable": (False, "1 when the aggregate estimate is not reliable, else 0"),
    "pooled_harm_probability": (False, "the series' pooled estimate over its runs within the horizon (absent "
                                       "when the pool is an upper bound only)"),
    "pooled_harm_probability_lower_bound": (False, "lower end of its interval (absent with it)"),
    "pooled_harm_probability_upper_bound": (False, "upper end of the pooled interval, or the pooled bound"),
    "pooled_estimate_unreliable": (False, "1 when the pooled estimate is an upper bound only, else 0"),
    "risk_increase_evidence": (False, "the change detector's e-statistic (absent while calibrating)"),
    "risk_increase_alarm": (False, "1 when the run raised a change alarm, 0 when armed without one "
                                   "(absent while calibrating)"),
    "run_failed": (False, "1 when the run failed, 0 when it succeeded (interrupted runs are not counted)"),
    "seconds_since_success": (False, "seconds since the last successful run (staleness; checked on a clock)"),
}
STALENESS = "seconds_since_success"

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Labels tailmon sets itself: a rule may not redefine what identifies its alert.
RESERVED_LABELS = ("alertname", "monitor", "severity", "tailmon_test")


def seconds(value, what: str) -> float:
    """A number of seconds (> 0) or a duration such as 30s, 5m, 6h."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be seconds (a number > 0) or a duration such as 30s or 5m, got {value!r}")
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{what} must be > 0, got {value!r}")
        return float(value)
    try:
        return float(parse_window(value))
    except InputError:
        raise ValueError(f"{what} must be seconds (a number > 0) or a duration such as 30s or 5m, "
                         f"got {value!r}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AlertRuleConfig(_Strict):
    """One entry of a monitor's `alerts:` list."""

    name: str
    metric: str | None = None
    window: str | None = None
    """For the per-window metrics: one of the monitor's volume.windows."""
    op: Literal[">", ">=", "<", "<="] | None = None
    threshold: float | None = None
    """For seconds_since_success also a duration (6h)."""
    resolve_threshold: float | None = None
    """Hysteresis: a firing alert resolves only once the value is no longer past this (default: threshold)."""
    for_runs: int = Field(1, ge=1, alias="for")
    """Consecutive runs past the threshold before the alert fires; pending until then."""
    severity: str = "warning"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    repeat_interval: str = "4h"
    """A firing alert is notified again after this long while it stays firing."""
    sinks: tuple[str, ...] | None = None
    """Sink names; default every sink (the log included)."""
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _duration_threshold(cls, data):
        # Staleness thresholds read best as durations; everything else is a plain number.
        if isinstance(data, dict) and data.get("metric") == STALENESS:
            data = dict(data)
            for key in ("threshold", "resolve_threshold"):
                if isinstance(data.get(key), str):
                    data[key] = seconds(data[key], key)
        return data

    @field_validator("name", "severity")
    @classmethod
    def _names(cls, value: str, info) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{info.field_name} must be lower-case letters, digits, '.', '_' or '-' "
                             f"(it is a label value), got {value!r}")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str | None) -> str | None:
        if value is not None and value not in METRICS:
            raise ValueError(f"unknown metric {value!r}; known: {', '.join(METRICS)}")
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_window(value)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if not _LABEL.match(key):
                raise ValueError(f"label name {key!r} must match [a-zA-Z_][a-zA-Z0-9_]* (Prometheus label names)")
            if key in RESERVED_LABELS:
                raise ValueError(f"label {key!r} is set by tailmon itself")
        return labels

    @field_validator("repeat_interval")
    @classmethod
    def _repeat(cls, value: str) -> str:
        seconds(value, "repeat_interval")
        return value

    @model_validator(mode="after")
    def _condition(self):
        if self.name in BUILTINS:
            fixed = [k for k in ("metric", "window", "op", "threshold", "resolve_threshold")
                     if k in self.model_fields_set]
            if fixed:
                what = ("the aggregate estimate is not reliable" if self.name == BUILTIN_UNRELIABLE
                        else "the change detector raised an alarm")
                raise ValueError(f"the built-in rule {self.name!r} has a fixed condition ({what}): remove "
                                 f"{', '.join(fixed)}; it takes severity, for, labels, annotations, "
                                 "repeat_interval, sinks and enabled")
            return self
        missing = [k for k in ("metric", "op", "threshold") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"rule {self.name!r} needs {', '.join(missing)}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        per_window = METRICS[self.metric][0]
        if per_window and self.window is None:
            raise ValueError(f"metric {self.metric!r} is per window: give window (one of the monitor's "
                             "volume.windows)")
        if not per_window and self.window is not None:
            raise ValueError(f"metric {self.metric!r} has no window: remove window")
        if self.metric == STALENESS and self.for_runs != 1:
            raise ValueError("seconds_since_success is checked on a clock, not per run: its threshold is "
                             "already the duration; remove for")
        r = self.resolve_threshold
        if r is not None:
            if not math.isfinite(r):
                raise ValueError(f"resolve_threshold must be a finite number, got {r!r}")
            if self.op in (">", ">=") and r > self.threshold:
                raise ValueError(f"resolve_threshold ({r:g}) must be <= threshold ({self.threshold:g}) for "
                                 f"op '{self.op}': the alert resolves once the value falls back to it")
            if self.op in ("<", "<=") and r < self.threshold:
                raise ValueError(f"resolve_threshold ({r:g}) must be >= threshold ({self.threshold:g}) for "
                                 f"op '{self.op}': the alert resolves once the value rises back to it")
        return self


_SINK_KEYS = {
    "log": (),
    "webhook": ("secret_env", "format"),
    "alertmanager": ("resend_interval",),
}
_HTTP_KEYS = ("url", "timeout", "retries", "backoff")


class SinkConfig(_Strict):
    """One entry of the top-level `alert_sinks:` mapping (name -> sink)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    type: Literal["log", "webhook", "alertmanager"]
    url: str | None = Field(None, repr=False)
    """webhook: the URL POSTed to; alertmanager: its base URL (http://host:9093)."""
    secret_env: str | None = None
    """webhook: environment variable holding the HMAC-SHA256 key (header X-Tailmon-Signature)."""
    format: Literal["json", "slack"] = "json"
    timeout: float = 10.0
    """Seconds (or a duration) per HTTP attempt."""
    retries: int = Field(3, ge=0, le=10)
    """Attempts after the first one, on connection errors, timeouts, 429 and 5xx."""
    backoff: float = 1.0
    """Delay before the first retry; doubles on each further one."""
    resend_interval: float = 60.0
    """alertmanager: how often a firing alert is re-sent (Alertmanager drops alerts not re-sent)."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+", value):
            raise ValueError("url must be an http:// or https:// URL")
        return value

    @field_validator("timeout", "backoff", "resend_interval", mode="before")
    @classmethod
    def _seconds(cls, value, info) -> float:
        return seconds(value, info.field_name)

    @field_validator("secret_env")
    @classmethod
    def _secret(cls, name: str | None) -> str | None:
        if name is None:
            return None
        if not re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", name):
            raise ValueError("secret_env must be the name of an environment variable (e.g. TAILMON_WEBHOOK_SECRET)")
        if not os.environ.get(name):
            raise ValueError(f"environment variable {name} (the webhook's HMAC secret) is not set or empty")
        return name

    @model_validator(mode="after")
    def _keys_of_the_type(self):
        own = _SINK_KEYS[self.type] + (_HTTP_KEYS if self.type != "log" else ())
        foreign = [k for k in self.model_fields_set if k != "type" and k not in own]
        if foreign:
            raise ValueError(f"sink type '{self.type}' does not take {', '.join(sorted(foreign))}")
        if self.type != "log" and self.url is None:
            raise ValueError(f"sink type '{self.type}' needs url")
        return self

    def secret(self) -> bytes | None:
        return os.environ[self.secret_env].encode() if self.secret_env else None


def check_sink_names(sinks: dict) -> dict:
    for name in sinks:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"sink name {name!r} must be lower-case letters, digits, '.', '_' or '-'")
    if LOG_SINK in sinks and sinks[LOG_SINK].type != "log":
        raise ValueError(f"the sink name {LOG_SINK!r} is reserved for the log")
    return sinks
