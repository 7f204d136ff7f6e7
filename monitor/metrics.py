"""Every Prometheus metric tailmon exports, declared in one place against a replaceable registry.

Values are set when a run ends (never computed on scrape). Labels are the monitor's name, the
extrapolation window, the sample role and the run status: never prompt text or prompt ids.
Names follow Prometheus conventions: `tailmon_` prefix, base units (seconds), probabilities as
0-1 ratios, `_total` for counters.
"""

from __future__ import annotations

import math
import platform
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tailmon import __version__
from tailmon.errors import RuntimeFailure
from tailmon.estimation.result import RunFigures

# Runs take minutes to hours; buckets from 10 s to 12 h.
RUN_DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200)


class Metrics:
    """The exporter's metrics. Tests pass a fresh `CollectorRegistry()` and read values back."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        m = ["monitor"]
        mw = ["monitor", "window"]
        self.harm_probability = Gauge(
            "tailmon_harm_probability", "Estimated probability that one query is answered harmfully "
            "(mean over the run's prompts of E[judge score]).", m, registry=r)
        self.harm_probability_lower = Gauge(
            "tailmon_harm_probability_lower_bound", "Lower end of the interval of tailmon_harm_probability, at the monitor's confidence (95% by default).",
            m, registry=r)
        self.harm_probability_upper = Gauge(
            "tailmon_harm_probability_upper_bound", "Upper end of the interval of tailmon_harm_probability, at the monitor's confidence (95% by default).",
            m, registry=r)
        self.expected_harmful = Gauge(
            "tailmon_expected_harmful_outputs", "Expected harmful outputs per window at the configured volume.",
            mw, registry=r)
        self.expected_harmful_upper = Gauge(
            "tailmon_expected_harmful_outputs_upper_bound", "Upper end of the interval of expected harmful outputs per window, at the monitor's confidence (95% by default).",
            mw, registry=r)
        self.p_any = Gauge(
            "tailmon_any_harmful_output_probability", "Probability of at least one harmful output in the window.",
            mw, registry=r)
        self.worst_query = Gauge(
            "tailmon_worst_query_harm_probability", "Forecast of the largest per-query harm probability among the "
            "window's queries (Gumbel tail fit on at least 10 prompts; absent when not fitted).", mw, registry=r)
        self.worst_query_lower = Gauge(
            "tailmon_worst_query_harm_probability_lower_bound", "Lower end of the 95% interval of "
            "tailmon_worst_query_harm_probability (absent when not fitted).", mw, registry=r)
        self.worst_query_upper = Gauge(
            "tailmon_worst_query_harm_probability_upper_bound", "Upper end of the 95% interval of "
            "tailmon_worst_query_harm_probability (absent when not fitted).", mw, registry=r)
        self.ess = Gauge(
            "tailmon_effective_sample_size", "Smallest effective sample size of w*h over the run's prompts.",
            m, registry=r)
        self.khat = Gauge(
            "tailmon_pareto_khat", "Largest Pareto k-hat of the importance weights over the run's prompts "
            "(> 0.7: weights unreliable).", m, registry=r)
        self.logprob_mismatch = Gauge(
            "tailmon_logprob_mismatch_nats", "Largest |sampled - re-scored| log-prob of a response over the "
            "run's re-scored samples (estimator.rescore_samples per prompt); above estimator.rescore_tolerance "
            "the estimates warn. +Inf: a sampled response scored -inf; NaN: none re-scored.", m, registry=r)
        self.mc_sample_ratio = Gauge(
            "tailmon_mc_sample_ratio", "Monte Carlo samples that would give the last run's standard errors, per "
            "sample it drew (> 1: importance sampling needed fewer). Absent when any prompt's estimate is "
            "unreliable or zero.", m, registry=r)
        self.mc_time_ratio = Gauge(
            "tailmon_mc_time_ratio", "Wall time plain Monte Carlo would need for the last run's standard errors, "
            "per second the run's generation, scoring and judging took. Absent when tailmon_mc_sample_ratio is.",
            m, registry=r)
        self.reliable = Gauge(
            "tailmon_estimate_reliable", "1 when the aggregate is reliable (every prompt's estimate passed the "
            "reliability rule, at least 20 prompts, fitted spread of ln P over prompts at most 1.5), else 0.",
            m, registry=r)
        # The series' pooled figures (tailmon.estimation.history): new names, so that the run's own
        # series and every query on them stay as they were.
        self.pooled_p = Gauge(
            "tailmon_pooled_harm_probability", "The series' pooled estimate of P(harmful answer) for one query, over "
            "its runs within the pooling horizon (absent when the pool is an upper bound only).", m, registry=r)
        self.pooled_lower = Gauge(
            "tailmon_pooled_harm_probability_lower_bound", "Lower end of the pooled interval at the monitor's "
            "confidence (absent with tailmon_pooled_harm_probability).", m, registry=r)
        self.pooled_upper = Gauge(
            "tailmon_pooled_harm_probability_upper_bound", "Upper end of the pooled interval at the monitor's "
            "confidence; the pooled upper bound when the pool has an unreliable part.", m, registry=r)
        self.pooled_reliable = Gauge(
            "tailmon_pooled_estimate_reliable", "1 when the pooled estimate is reliable (a point with an interval), "
            "0 when it is an upper bound only.", m, registry=r)
        self.pooled_mc = Gauge(
            "tailmon_pooled_mc_equivalent_samples", "Monte Carlo samples that would give every pooled prompt's "
            "standard error (absent when any pooled estimate is unreliable or zero).", m, registry=r)
        self.pooled_runs = Gauge("tailmon_pooled_runs", "Runs in the pooled estimate.", m, registry=r)
        self.pooled_samples = Gauge("tailmon_pooled_samples", "Samples in the pooled estimate.", m, registry=r)
        self.change_evidence = Gauge(
            "tailmon_risk_increase_evidence", "The change detector's e-statistic (Shiryaev-Roberts over e-values "
            "against the reference's upper bound); an alarm at tailmon_risk_increase_threshold. Absent while "
            "the detector calibrates or is off.", m, registry=r)
        self.change_threshold = Gauge(
            "tailmon_risk_increase_threshold", "1/alpha of the change detector (absent when it is off).", m,
            registry=r)
        self.change_alarm = Gauge(
            "tailmon_risk_increase_alarm", "1 when the last run raised a change alarm, 0 when armed without one "
            "(absent while calibrating or off).", m, registry=r)
        self.samples = Counter(
            "tailmon_samples_generated", "Responses generated, by role (target: the deployed model itself; "
            "proposal: an unsafe variant).", ["monitor", "role"], registry=r)
        self.runs = Counter("tailmon_runs", "Runs by final status.", ["monitor", "status"], registry=r)
        self.run_duration = Histogram(
            "tailmon_run_duration_seconds", "Wall time of runs that ended (any status).", m,
            buckets=RUN_DURATION_BUCKETS, registry=r)
        self.last_success = Gauge(
            "tailmon_last_success_timestamp_seconds", "Unix time the last successful run ended.", m, registry=r)
        self.last_run = Gauge(
            "tailmon_last_run_timestamp_seconds", "Unix time the last run ended (any status).", m, registry=r)
        self.running = Gauge("tailmon_run_in_progress", "1 while a run of the monitor is going.", m, registry=r)
        self.model_info = Gauge(
            "tailmon_model_info", "The checkpoint a monitor estimates, as labels (value 1).",
            ["monitor", "model", "model_version"], registry=r)
        self.alert_state = Gauge(
            "tailmon_alert_state", "State of each alert rule: 0 inactive or resolved, 1 pending, 2 firing.",
            ["monitor", "rule", "severity"], registry=r)
        self.build_info = Gauge("tailmon_build_info", "tailmon's version (value 1).", ["version", "python"], registry=r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self._model_labels: dict[str, tuple] = {}

    def init_monitor(self, monitor: str) -> None:
        """Make the counters of a configured monitor exist at 0 before its first run: rate() and
        increase() need a sample before the first increment, or they never see it."""
        for status in ("succeeded", "failed", "interrupted"):
            self.runs.labels(monitor, status)
        for role in ("target", "proposal"):
            self.samples.labels(monitor, role)
        self.run_duration.labels(monitor)  # its _count and _sum are counters too
        # A new child starts at 0; an existing one keeps its value: a reload (SIGHUP) during a
        # run set it to 0 while the run went on.
        self.running.labels(monitor)

    def forget_monitor(self, monitor: str) -> None:
        """Remove every series of a monitor (it left the config): Prometheus then sees it gone."""
        for metric in vars(self).values():
            names = getattr(metric, "_labelnames", ())
            if "monitor" not in names:
                continue
            i = names.index("monitor")
            # prometheus_client has no public way to list a metric's children; _metrics is its dict.
            for labels in [k for k in list(metric._metrics) if k[i] == monitor]:
                metric.remove(*labels)
        self._model_labels.pop(monitor, None)

    def set_model(self, monitor: str, model: str, version: int) -> None:
        old = self._model_labels.get(monitor)
        if old is not None and old != (monitor, model, str(version)):
            self.model_info.remove(*old)
        labels = (monitor, model, str(version))
        self.model_info.labels(*labels).set(1)
        self._model_labels[monitor] = labels

    def record_figures(self, monitor: str, figures: RunFigures) -> None:
        """Set the gauges from a successful run's figures."""
        self.harm_probability.labels(monitor).set(figures.p_hat)
        self.harm_probability_lower.labels(monitor).set(figures.ci_low)
        self.harm_probability_upper.labels(monitor).set(figures.ci_high)
        self.reliable.labels(monitor).set(1 if figures.reliable else 0)
        _set_or_nan(self.ess.labels(monitor), figures.smallest_ess_wh)
        _set_or_nan(self.khat.labels(monitor), figures.largest_khat)
        _set_or_nan(self.logprob_mismatch.labels(monitor), figures.largest_logprob_diff)
        _set_or_absent(self.mc_sample_ratio, (monitor,), figures.mc_sample_ratio)
        _set_or_absent(self.mc_time_ratio, (monitor,), figures.mc_time_ratio)
        self.record_pooled(monitor, figures.pooled)
        for window, w in figures.windows.items():
            self.expected_harmful.labels(monitor, window).set(w.expected)
            self.expected_harmful_upper.labels(monitor, window).set(w.expected_high)
            self.p_any.labels(monitor, window).set(w.p_any)
            for gauge, value in ((self.worst_query, w.worst_query), (self.worst_query_lower, w.worst_query_low),
                                 (self.worst_query_upper, w.worst_query_high)):
                _set_or_absent(gauge, (monitor, window), value)

    def record_pooled(self, monitor: str, pooled) -> None:
        """The series' pooled figures (`RunFigures.pooled`); every one absent when there are none."""
        key = (monitor,)
        p = pooled
        for gauge, value in (
                (self.pooled_p, p and p.p_hat), (self.pooled_lower, p and p.ci_low),
                (self.pooled_upper, p and p.ci_high), (self.pooled_reliable, p and (1.0 if p.reliable else 0.0)),
                (self.pooled_mc, p and p.mc_equivalent_samples), (self.pooled_runs, p and p.n_runs),
                (self.pooled_samples, p and p.n_samples), (self.change_evidence, p and p.evidence),
                (self.change_threshold, p and p.threshold),
                (self.change_alarm, None if p is None or p.alarm is None else float(p.alarm))):
            _set_or_absent(gauge, key, value)

    def record_run(self, monitor: str, status: str, duration_s: float, ended_at: float,
                   samples_by_role: dict[str, int] | None = None) -> None:
        self.runs.labels(monitor, status).inc()
        self.run_duration.labels(monitor).observe(duration_s)
        self.last_run.labels(monitor).set(ended_at)
        if status == "succeeded":
            self.last_success.labels(monitor).set(ended_at)
        for role, n in (samples_by_role or {}).items():
            self.samples.labels(monitor, role).inc(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _set_or_nan(gauge, value) -> None:
    # NaN says "no value" in Prometheus; a stale number would be a lie.
    gauge.set(math.nan if value is None else value)


def _set_or_absent(gauge, labels: tuple, value) -> None:
    # A figure documented "absent when not fitted" is absent: a series left from an earlier run
    # is removed (its number would be a stale lie), and none is made (NaN would still be a series
    # that alerting rules and dashboards read as present).
    if value is None:
        if labels in gauge._metrics:  # prometheus_client has no public membership test
            gauge.remove(*labels)
    else:
        gauge.labels(*labels).set(value)


class MetricsServer:
    """/metrics (the exposition) and /healthz (200 while `healthy()` is true, else 503)."""

    def __init__(self, metrics: Metrics, address: str, port: int, healthy: Callable[[], bool] = lambda: True):
        metrics_ref, healthy_ref = metrics, healthy

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, metrics_ref.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = healthy_ref()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain")
                else:
                    self._reply(404, b"tailmon: /metrics or /healthz\n", "text/plain")

            def _reply(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every 15 s would flood the journal
                pass

        try:
            self.httpd = ThreadingHTTPServer((address, port), Handler)
        except OSError as exc:
            raise RuntimeFailure(f"metrics server cannot bind {address}:{port}: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="tailmon-metrics", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
