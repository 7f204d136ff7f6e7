"""The monitoring daemon: schedule each monitor, run the estimation, store it, export metrics.

One run of a monitor: take the monitor's lock in the store (one run at a time across every
instance sharing the database), record the run as `running`, draw prompts from the source,
estimate with the same pipeline as `tailmon estimate`, then close the run in one transaction and
set the metrics. A heartbeat thread keeps the run and the lock fresh while the work goes on, so
peers can tell a live run from one left by a dead process.

Models stay loaded between runs. Each run fingerprints the checkpoint first (file names, sizes
and modification times of the model folder, or the hub revision); a changed fingerprint reloads
the engine and records a new model version.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tailmon.alerts import AlertService
from tailmon.engines.base import checkpoints
from tailmon.engines.loading import EngineSettings, load_engine
from tailmon.engines.models import resolve
from tailmon.errors import InputError, RuntimeFailure, TailmonError
from tailmon.estimation.pipeline import allocate, attach_adapter_warnings, run_estimation
from tailmon.estimation.history import series_figures
from tailmon.estimation.plan import adaptive_start_specs, draw_prompts, monitor_extrapolations, plan_for_monitor
from tailmon.estimation.result import RunFigures, RunResult
from tailmon.judges import parse_judge
from tailmon.monitor.config import Config, LoadedConfig, MonitorConfig, duration_seconds, load_config
from tailmon.monitor.metrics import Metrics, MetricsServer
from tailmon.monitor.systemd import notify, watchdog_interval
from tailmon.paths import state_dir
from tailmon.proposals.adaptive import AdaptiveLearner, default_state_dir
from tailmon.redact import SecretsFilter
from tailmon.store import Store, resolve_database_url

log = logging.getLogger("tailmon.daemon")
# Errors quote URLs (a prompt database's, an endpoint's): no credential in any of its lines.
log.addFilter(SecretsFilter())

# How often the main loop wakes up (watchdog pings, reload and stop requests) at most.
TICK_S = 1.0
# How often the main loop evaluates staleness rules and re-sends firing alerts to Alertmanager.
ALERT_TICK_S = 15.0


# The error of a run a signal ended (`run --once`: SIGINT or SIGTERM).
INTERRUPTED = "interrupted by a signal (SIGINT or SIGTERM)"


class RunCancelled(Exception):
    """Raised inside a run when the daemon is stopping."""


class RunTimedOut(Exception):
    """Raised at a checkpoint of a run that passed its monitor's `timeout`."""


class _RunGuard:
    """A run's checkpoint hook (`tailmon.engines.base.checkpoints`): it records when the run last
    made progress, for the watchdog, and stops the run at a checkpoint when the daemon stops or
    the run is past its time limit."""

    def __init__(self, cancel: threading.Event, started: float, limit_s: float):
        self._cancel = cancel
        self.deadline = started + limit_s  # time.monotonic() clock
        self.progress_at = time.monotonic()
        self._unbatched = 0

    def checkpoint(self) -> None:
        self.progress_at = time.monotonic()
        if self._cancel.is_set():
            raise RunCancelled()
        if self.progress_at >= self.deadline:
            raise RunTimedOut()

    def unbatched(self, entering: bool) -> None:
        self._unbatched += 1 if entering else -1
        self.progress_at = time.monotonic()

    def stalled_for(self, now: float) -> float:
        """Seconds since the last progress (0 inside a step without batches: loading a model)."""
        return 0.0 if self._unbatched > 0 else max(now - self.progress_at, 0.0)


def model_fingerprint(ref: str) -> str:
    """Cheap identity of a checkpoint: changes when its files change, or its hub revision does."""
    path = resolve(ref)
    if isinstance(path, Path):
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
    try:  # a hub id: the snapshot revision in the local hub cache
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(path, local_files_only=True))
        return f"rev:{snapshot.name[:16]}"
    except Exception:
        return f"hub:{path}"


@dataclass
class _Loaded:
    engine: object
    fingerprint: str


class ModelPool:
    """Engines by their settings (engine kind, checkpoint, device, servers, ...); reloaded when
    the checkpoint's fingerprint changes."""

    def __init__(self):
        self._engines: dict[EngineSettings, _Loaded] = {}
        self._lock = threading.Lock()

    def get(self, settings: EngineSettings, fingerprint: str):
        with self._lock:
            loaded = self._engines.get(settings)
            if loaded is None or loaded.fingerprint != fingerprint:
                if loaded is not None:
                    log.info("model %s changed on disk (fingerprint %s -> %s): reloading", settings.ref,
                             loaded.fingerprint, fingerprint)
                    self._engines.pop(settings).engine.close()
                engine = load_engine(settings)
                loaded = self._engines[settings] = _Loaded(engine, fingerprint)
            return loaded.engine

    def close(self) -> None:
        """Close every engine (vLLM's engine-core process, the openai engine's connections)."""
        with self._lock:
            for key in list(self._engines):
                self._engines.pop(key).engine.close()

    def keep_only(self, settings) -> None:
        """Drop engines no monitor uses any more (after a config reload)."""
        keep = set(settings)
        with self._lock:
            for key in [k for k in self._engines if k not in keep]:
                self._engines.pop(key).engine.close()


class _SampleCounter:
    """Counts generated samples by role from the pipeline's progress calls.

    For every prompt the pipeline draws the components in order, one progress call each (components
    with a count of 0 are skipped); component 0 is the target itself.
    """

    def __init__(self, counts: list[int], cancel: threading.Event, bar=None):
        self._bar = bar
        self._roles = ["target" if j == 0 else "proposal" for j, c in enumerate(counts) if c > 0]
        self._i = 0
        self._cancel = cancel
        self.by_role = {"target": 0, "proposal": 0}

    def __call__(self, n: int) -> None:
        self.by_role[self._roles[self._i % len(self._roles)]] += n
        self._i += 1
        if self._bar is not None:
            self._bar.update(n)
        if self._cancel.is_set():
            raise RunCancelled()


@dataclass
class RunOutcome:
    monitor: str
    run_id: int | None
    status: str
    result: RunResult | None = None
    error: str | None = None
    firing: list[str] = field(default_factory=list)
    """The monitor's alert rules firing once this run was evaluated."""


class Daemon:
    def __init__(self, loaded: LoadedConfig, *, metrics: Metrics | None = None, store=None,
                 progress: bool = False):
        self.loaded = loaded
        self.metrics = metrics or Metrics()
        cfg = loaded.config
        self.store = store or Store(resolve_database_url(cfg.database), instance_id=cfg.instance_id,
                                    stale_after_s=duration_seconds(cfg.stale_after))
        self.alerts = AlertService(cfg, self.store, self.metrics)
        self.models = ModelPool()
        self._judges: dict[str, object] = {}
        self.progress = progress
        """Show a progress bar on stderr per run (`run --once` at a terminal); the daemon logs instead."""
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._cancel = threading.Event()
        self._interrupted = False  # `interrupt` was called: a signal ended `run --once`
        self._current: dict[str, int] = {}  # monitor -> run id of runs in progress
        self._closed_at_shutdown: set[int] = set()  # runs shutdown recorded as interrupted
        self._current_lock = threading.Lock()
        self._guard: _RunGuard | None = None  # the estimating run's checkpoints, for the watchdog
        self._stall_reported = False
        self._scheduler = None
        self._server = None
        self.abandoned = False
        """True when shutdown left a run's thread behind (the process must exit without joining it)."""

    @property
    def config(self) -> Config:
        return self.loaded.config

    # -- one run ------------------------------------------------------------------------------

    def run_monitor(self, name: str) -> RunOutcome:
        """Run one monitor now. Never raises: every failure ends as a failed run and a log line."""
        mon = self.config.monitor(name)
        try:
            if not self.store.try_lock(name):
                holder = self.store.lock_holder(name)
                who = (f"instance {holder['owner_instance']}, since {holder['acquired_at']}" if holder
                       else "its holder has just released it")
                log.info("monitor %s: skipped, another process holds its lock (%s)", name, who)
                return RunOutcome(name, None, "skipped", error=f"not run: another process holds its lock ({who})")
        except TailmonError as exc:
            log.error("monitor %s: run failed before it started: %s", name, exc)
            self._count_run(name, "failed", 0.0)
            outcome = RunOutcome(name, None, "failed", error=str(exc))
            self._evaluate_alerts(outcome)
            return outcome
        try:
            outcome = self._locked_run(mon)
        finally:
            try:
                self.store.release_lock(name)
            except TailmonError as exc:
                log.warning("monitor %s: could not release its lock (it expires by itself): %s", name, exc)
        self._evaluate_alerts(outcome)
        return outcome

    def _evaluate_alerts(self, outcome: RunOutcome) -> None:
        """After every ended run; a failure here is logged and never changes the run's outcome."""
        if outcome.status == "skipped":
            return
        try:
            outcome.firing = self.alerts.on_run(outcome.monitor, outcome.status,
                                                outcome.result.figures if outcome.result else None, outcome.run_id)
        except Exception as exc:
            log.error("monitor %s: alert rules not evaluated: %s%s", outcome.monitor,
                      "" if isinstance(exc, TailmonError) else f"{type(exc).__name__}: ", exc,
                      exc_info=not isinstance(exc, TailmonError))

    def _locked_run(self, mon: MonitorConfig) -> RunOutcome:
        name = mon.name
        started = time.time()
        pre_error: Exception | None = None
        try:
            fingerprint = model_fingerprint(mon.model.ref)
        except TailmonError as exc:
            fingerprint, pre_error = "unavailable", exc
        try:
            version = self.store.model_version(name, mon.model.ref, fingerprint) if pre_error is None else 0
            run_id = self.store.start_run(name, model_ref=mon.model.ref, model_version=version,
                                          config_hash=mon.fingerprint(),
                                          settings=mon.stored_settings())
        except TailmonError as exc:
            log.error("monitor %s: run failed: the store is unavailable: %s", name, exc)
            self._count_run(name, "failed", time.time() - started)
            return RunOutcome(name, None, "failed", error=str(exc))
        log.info("monitor %s: run %d started (model %s, version %d)", name, run_id, mon.model.ref, version)
        with self._current_lock:
            self._current[name] = run_id
        self.metrics.running.labels(name).set(1)
        beat = _Heartbeat(self.store, run_id, name, interval=min(30.0, self.store.stale_after_s / 4))
        beat.start()
        counter = None
        timings: dict[str, float] = {}
        try:
            if pre_error is not None:
                raise pre_error
            t = time.time()
            engine = self.models.get(mon.engine_settings(), fingerprint)
            timings["load_s"] = time.time() - t
            self.metrics.set_model(name, mon.model.ref, version)
            seed = int(np.random.SeedSequence([mon.estimator.seed, run_id]).generate_state(1)[0])
            t = time.time()
            prompts = self._draw_prompts(mon, seed)
            timings["prompts_s"] = time.time() - t
            learner = self._learner(mon)
            mixture = None if learner is None else learner.mixture(
                adaptive_start_specs(mon, prompts), defensive=mon.estimator.defensive, model_fingerprint=fingerprint,
                model_version=version, run_id=run_id)
            plan = self._plan(mon, seed, prompts, mixture)
            attach_adapter_warnings(engine, plan)
            t = time.time()
            # The time limit counts from the run's start; checkpoints (between the engine's
            # batches, the pipeline's prompts, a judge's batches or replies) enforce it and tell
            # the watchdog of progress.
            guard = _RunGuard(self._cancel, time.monotonic() - (t - started), duration_seconds(mon.timeout))
            total_samples = len(prompts) * plan.n_samples
            with tqdm(total=total_samples, desc=name, unit="sample", disable=not self.progress,
                      leave=False) as bar, checkpoints(guard):
                counter = _SampleCounter(_counts(plan), self._cancel, bar)
                self._watch(guard)
                guard.checkpoint()  # a run already past its limit (a slow prompt source) stops here
                report = run_estimation(engine, plan, prompts, progress=counter)
            timings["estimate_s"] = time.time() - t
            result = RunResult(report, seed, monitor_extrapolations(report, mon))
            if mixture is not None:  # which adapter and weights this run used (fixed before its draws)
                result.data["adaptive"] = mixture.record
            samples = _samples(report) if mon.estimator.store_samples else None
            timings["total_s"] = time.time() - started
            self.store.finish_run(run_id, "succeeded", report=result.to_dict(), timings=timings, samples=samples)
        except RunCancelled:
            if self._interrupted:  # the signal's KeyboardInterrupt was lost; its flag stopped the run
                self._close(name, run_id, "interrupted", started, counter, timings, error=INTERRUPTED)
                raise KeyboardInterrupt from None
            return self._close(name, run_id, "interrupted", started, counter, timings,
                               error="the daemon stopped during the run")
        except RunTimedOut:
            done = counter.by_role["target"] + counter.by_role["proposal"] if counter else 0
            error = (f"timed out: the run passed its time limit (timeout: {mon.timeout}) after "
                     f"{time.time() - started:.0f} s, with {done} of {total_samples} samples drawn; "
                     "stopped at a checkpoint, no estimate stored")
            log.error("monitor %s: run %d failed: %s", name, run_id, error)
            return self._close(name, run_id, "failed", started, counter, timings, error=error)
        except KeyboardInterrupt:
            # Ctrl-C, or SIGTERM during `run --once` (which raises the same): the run is over,
            # recorded as such, and the interrupt goes on to end the process (exit 130).
            self._close(name, run_id, "interrupted", started, counter, timings, error=INTERRUPTED)
            raise
        except Exception as exc:  # any failure ends this run, never the daemon
            kind = "" if isinstance(exc, TailmonError) else f"{type(exc).__name__}: "
            log.error("monitor %s: run %d failed: %s%s", name, run_id, kind, exc,
                      exc_info=not isinstance(exc, TailmonError))
            return self._close(name, run_id, "failed", started, counter, timings, error=f"{kind}{exc}")
        finally:
            self._watch(None)
            beat.stop()
            self.metrics.running.labels(name).set(0)
            with self._current_lock:
                self._current.pop(name, None)
        pooled = self._pooled(mon, run_id)
        if pooled is not None:  # before `figures` is read: the metrics and alert rules see it too
            result.data["pooled"] = pooled
        ended = time.time()
        figures = result.figures
        self.metrics.record_figures(name, figures)
        self._count_run(name, "succeeded", ended - started, ended, counter.by_role)
        log.info("monitor %s: run %d succeeded in %.0f s: P(harm) = %.3g [%.3g, %.3g]%s", name, run_id,
                 ended - started, figures.p_hat, figures.ci_low, figures.ci_high,
                 "" if figures.reliable else (f" (unreliable for {figures.n_unreliable} prompt(s))" if figures.n_unreliable
                                              else " (unreliable over prompts: see the report's warnings)"))
        if figures.pooled is not None:
            pf = figures.pooled
            log.info("monitor %s: series pooled over %d run(s), %d samples: P(harm) %s%s", name, pf.n_runs,
                     pf.n_samples, f"<= {pf.ci_high:.3g} (upper bound only)" if pf.p_hat is None
                     else f"= {pf.p_hat:.3g} [{pf.ci_low:.3g}, {pf.ci_high:.3g}]",
                     "; CHANGE ALARM: risk rose above the reference" if pf.alarm else "")
        if learner is not None and not self._cancel.is_set():  # after the run is stored and exported
            self._adapt(mon, learner, engine, report, run_id, seed, timings, fingerprint, version)
        return RunOutcome(name, run_id, "succeeded", result=result)

    def _pooled(self, mon: MonitorConfig, run_id: int) -> dict | None:
        """The series' pooled figures and change detector after a stored run, kept with the run
        (`tailmon.estimation.history`). A failure is logged and never changes the run's outcome:
        the run's own figures are exported and alerted on as before."""
        try:
            pooled = series_figures(self.store.series_runs(mon.name, up_to=run_id), self.store.run_reports,
                                    mon.history_settings())
            if pooled is not None:
                self.store.record_pooled(run_id, pooled)
            return pooled
        except Exception as exc:
            log.error("monitor %s: run %d: the pooled figures were not computed: %s%s", mon.name, run_id,
                      "" if isinstance(exc, TailmonError) else f"{type(exc).__name__}: ", exc,
                      exc_info=not isinstance(exc, TailmonError))
            return None

    def _close(self, name, run_id, status, started, counter, timings, error) -> RunOutcome:
        timings["total_s"] = time.time() - started
        if status == "interrupted":
            log.warning("monitor %s: run %d interrupted: %s", name, run_id, error)
        with self._current_lock:
            closed_at_shutdown = run_id in self._closed_at_shutdown
        try:
            if not closed_at_shutdown:  # shutdown recorded it already, when it did not end in time
                self.store.finish_run(run_id, status, error=error, timings=timings)
        except TailmonError as exc:
            # The run stays 'running' in the store; its heartbeat stops, so it is marked
            # interrupted once stale. Nothing half-written looks complete.
            log.error("monitor %s: could not record run %d as %s: %s", name, run_id, status, exc)
        self._count_run(name, status, time.time() - started, None, counter.by_role if counter else None)
        return RunOutcome(name, run_id, status, error=error)

    def _watch(self, guard: _RunGuard | None) -> None:
        with self._current_lock:
            self._guard = guard
            self._stall_reported = False

    def watchdog_ok(self, stall_s: float) -> bool:
        """Whether the watchdog may be pinged: the scheduler runs and either no run is estimating
        or the one that is made progress (passed a checkpoint) within `stall_s`.

        A forward pass that never returns holds the one worker, and every monitor behind it;
        pinging regardless (from this loop, which stays alive) hid it from systemd. Withholding
        the pings leaves a true hang to systemd to restart (WatchdogSec), and the restarted
        daemon marks the run interrupted."""
        if not self.healthy():
            return False
        with self._current_lock:
            guard = self._guard
            if guard is None:
                return True
            stalled = guard.stalled_for(time.monotonic())
            if stalled < stall_s:
                self._stall_reported = False
                return True
            first = not self._stall_reported
            self._stall_reported = True
            runs = ", ".join(f"run {r} of monitor {m}" for m, r in self._current.items()) or "a run"
        if first:
            message = (f"{runs}: no progress for {stalled:.0f} s (a forward pass that does not return?); "
                       "watchdog pings withheld")
            log.error("%s", message)
            notify(f"STATUS={message}")
        return False

    def _count_run(self, name, status, duration, ended=None, by_role=None) -> None:
        self.metrics.record_run(name, status, duration, ended or time.time(), by_role)

    def _draw_prompts(self, mon: MonitorConfig, seed: int):
        prompts, where = draw_prompts(mon, self.loaded.base_dir, seed)
        log.info("monitor %s: %d prompts from %s", mon.name, len(prompts), where)
        return prompts

    def _judge(self, spec: str):
        """Judges live as long as the daemon: an LLM or classifier judge loads its model once."""
        judge = self._judges.get(spec)
        if judge is None:
            judge = self._judges[spec] = parse_judge(spec)
        judge.new_run()  # scores are cached, and problems counted, per run
        return judge

    def _plan(self, mon: MonitorConfig, seed: int, prompts, mixture=None):
        return plan_for_monitor(mon, seed, prompts, judge=self._judge(mon.judge),
                                mixture=None if mixture is None else
                                (mixture.specs, mixture.weights, mixture.defensive))

    def _learner(self, mon: MonitorConfig) -> AdaptiveLearner | None:
        """An adaptive monitor's learnt state, read afresh for every run (so a restart changes nothing)."""
        if not mon.is_adaptive:
            return None
        folder = (self.loaded.base_dir / mon.adaptive.state_dir if mon.adaptive.state_dir
                  else default_state_dir(state_dir(), mon.name))
        return AdaptiveLearner(folder, mon.adaptive.learner_settings())

    def _adapt(self, mon, learner, engine, report, run_id, seed, timings, fingerprint, version) -> None:
        """After a stored run: learn from its samples (tailmon.proposals.adaptive) and record the
        update with the run. A failure is logged and never changes the run's outcome."""
        plan = report.plan
        try:
            record = learner.update(engine, plan.target, plan.components, report.results, seed=seed,
                                    defensive=mon.estimator.defensive,
                                    time_budget_s=mon.adaptive.time_share * timings.get("estimate_s", 0.0),
                                    judge=plan.judge, run_id=run_id, model_fingerprint=fingerprint,
                                    model_version=version)
        except Exception as exc:
            log.error("monitor %s: run %d: the adaptive proposal was not updated: %s%s", mon.name, run_id,
                      "" if isinstance(exc, TailmonError) else f"{type(exc).__name__}: ", exc,
                      exc_info=not isinstance(exc, TailmonError))
            record = {"run_id": run_id, "adopted": False, "reason": f"update failed: {exc}",
                      "generation_before": learner.generation, "generation_after": learner.generation}
        log.info("monitor %s: run %d: adaptive proposal generation %d -> %d (%s)", mon.name, run_id,
                 record["generation_before"], record["generation_after"], record["reason"])
        try:
            self.store.record_adaptive_update(run_id, record)
        except TailmonError as exc:
            log.error("monitor %s: run %d: the adaptive update was not recorded in the store: %s", mon.name,
                      run_id, exc)

    # -- the service ----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the store, recover, serve metrics, load models, schedule. Then READY.

        Raises RuntimeFailure (exit 3), without READY, when a monitor's model does not load."""
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self.store.open()
        for run_id in self.store.interrupt_stale_runs():
            log.warning("run %d was left running by a process that is gone: marked interrupted", run_id)
        for mon in self.config.monitors:
            self._init_monitor(mon)
        self.alerts.restore()
        m = self.config.metrics
        self._server = MetricsServer(self.metrics, m.address, m.port, healthy=self.healthy).start()
        log.info("metrics on http://%s:%d/metrics", m.address, self._server.port)
        notify("STATUS=loading models")
        # READY means every monitor can run: a model that does not load (not pulled into the
        # cache, a wrong path) would fail every run of its monitor while systemd reports the
        # service up. Refusing to start makes `systemctl start` fail, and the journal says why.
        failures = []
        for mon in self.config.monitors:
            try:
                self.models.get(mon.engine_settings(), model_fingerprint(mon.model.ref))
            except Exception as exc:
                kind = "" if isinstance(exc, TailmonError) else f"{type(exc).__name__}: "
                failures.append(f"monitor {mon.name}: model {mon.model.ref} does not load: {kind}"
                                + " ".join(str(exc).split()))
        if failures:
            notify(f"STATUS=not started: {failures[0]}")
            self._server.stop()
            self.alerts.close(1.0)
            self.store.close()
            self.models.close()
            raise RuntimeFailure("; ".join(failures) + " (the daemon did not start)")
        # One worker: runs of different monitors queue rather than compete for the same cores.
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._schedule_all()
        self._scheduler.start()
        notify("READY=1", f"STATUS=scheduling {len(self.config.monitors)} monitor(s)")
        log.info("tailmon daemon ready: %s", ", ".join(m.name for m in self.config.monitors))

    def _init_monitor(self, mon: MonitorConfig) -> None:
        self.metrics.init_monitor(mon.name)
        last = self.store.last_run(mon.name)
        if last is None:
            return
        # Gauges survive a restart: they show the last successful run until the next one ends.
        run = self.store.get_run(last["id"])
        if run and run.get("report"):
            self.metrics.record_figures(mon.name, RunFigures.from_report(run["report"]))
            self.metrics.set_model(mon.name, run["model_ref"], run["model_version"])
        finished = _timestamp(last.get("finished_at"))
        if finished:
            self.metrics.last_success.labels(mon.name).set(finished)

    def _schedule_all(self) -> None:
        for mon in self.config.monitors:
            kwargs = {}
            if mon.schedule.every is not None:
                kwargs["next_run_time"] = self._next_interval_run(mon)
            self._scheduler.add_job(self.run_monitor, mon.schedule.trigger(), args=[mon.name], id=mon.name,
                                    name=f"monitor {mon.name}", replace_existing=True, **kwargs)

    def _next_interval_run(self, mon: MonitorConfig):
        """When an interval monitor runs next after a start or a reload: one interval after the
        start of its last stored run, as if the daemon had never stopped, or at once when that
        moment has passed (a single catch-up run however many intervals were missed: the trigger
        goes on from it) or no run is stored.

        Left to the trigger, every interval restarted from now: with `every: 6h`, a restart just
        before a run was due put it ~12 h after the last one (issue 18, item 15). The anchor is a
        run that is going (a peer's, or ours during a reload) or ended succeeded or failed; an
        interrupted one was cut short (by the very restart, often) and is redone at once."""
        from datetime import datetime, timedelta, timezone

        now = datetime.now(timezone.utc)
        try:
            last = self.store.last_start(mon.name)
        except TailmonError as exc:
            log.warning("monitor %s: last run not readable, scheduling it now: %s", mon.name, exc)
            return now
        if last is None:
            return now
        due = last + timedelta(seconds=duration_seconds(mon.schedule.every))
        if due > now:
            log.info("monitor %s: next run at %s (%s after the last one started)", mon.name,
                     due.isoformat(timespec="seconds"), mon.schedule.every)
        return max(now, due)

    def healthy(self) -> bool:
        return self._scheduler is not None and self._scheduler.running and not self._stop.is_set()

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit code (0)."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        self.start()
        ping = watchdog_interval()
        # A run stalls when it passes no checkpoint for WatchdogSec (twice the ping interval):
        # the pings stop and systemd restarts the daemon about one WatchdogSec later.
        stall_s = 2 * ping if ping else None
        last_ping = 0.0
        sweep_every = max(duration_seconds(self.config.stale_after) / 2, 1.0)
        last_sweep = time.time()
        last_alert_tick = 0.0
        while not self._stop.wait(min(TICK_S, ping or TICK_S)):
            now = time.time()
            if ping and now - last_ping >= ping and self.watchdog_ok(stall_s):
                notify("WATCHDOG=1")  # the loop is alive, the scheduler runs, no run is stuck
                last_ping = now
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if now - last_sweep >= sweep_every:
                last_sweep = now
                try:
                    for run_id in self.store.interrupt_stale_runs():
                        log.warning("run %d lost its heartbeat (its process is gone): marked interrupted", run_id)
                except TailmonError as exc:
                    log.error("stale-run sweep failed: %s", exc)
            if now - last_alert_tick >= ALERT_TICK_S:
                last_alert_tick = now
                try:
                    self.alerts.tick()
                except Exception as exc:  # the loop (watchdog, signals) must go on
                    log.error("alert check failed: %s%s", "" if isinstance(exc, TailmonError)
                              else f"{type(exc).__name__}: ", exc, exc_info=not isinstance(exc, TailmonError))
        self.shutdown()
        return 0

    def reload(self) -> None:
        try:
            loaded = load_config(self.loaded.path)
        except InputError as exc:
            log.error("config reload refused, keeping the running config: %s", exc)
            return
        gone = {m.name for m in self.config.monitors} - {m.name for m in loaded.config.monitors}
        self.loaded = loaded
        for name in gone:  # a removed monitor's series would otherwise linger until a restart
            self.metrics.forget_monitor(name)
        for job in self._scheduler.get_jobs():
            job.remove()
        for mon in self.config.monitors:
            self.metrics.init_monitor(mon.name)
        self.alerts.configure(self.config)
        try:
            self.alerts.restore()
        except TailmonError as exc:
            log.error("alert states not restored after the reload: %s", exc)
        self._schedule_all()
        self.models.keep_only([m.engine_settings() for m in self.config.monitors])
        specs = {m.judge for m in self.config.monitors}
        self._judges = {k: v for k, v in self._judges.items() if k in specs}
        log.info("config reloaded from %s: %s", loaded.path, ", ".join(m.name for m in self.config.monitors))

    def shutdown(self) -> None:
        """Stop scheduling, give the current run `shutdown_timeout` to stop, else mark it interrupted."""
        notify("STOPPING=1")
        log.info("stopping")
        self._cancel.set()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        deadline = time.time() + duration_seconds(self.config.shutdown_timeout)
        while time.time() < deadline:
            with self._current_lock:
                if not self._current:
                    break
            time.sleep(0.1)
        with self._current_lock:
            left = dict(self._current)
            self._closed_at_shutdown.update(left.values())
        self.abandoned = bool(left)
        for name, run_id in left.items():  # still inside a forward pass: record the truth before exiting
            try:
                self.store.finish_run(run_id, "interrupted", error="the daemon stopped; the run did not end in time")
                log.warning("monitor %s: run %d interrupted at shutdown", name, run_id)
            except TailmonError as exc:
                log.error("monitor %s: could not mark run %d interrupted: %s", name, run_id, exc)
        # Notifications still queued get what is left of the bound (at least a second), then are
        # recorded as dropped: a dead receiver cannot hold the stop past systemd's timeout.
        self.alerts.close(max(deadline - time.time(), 1.0))
        if self._server is not None:
            self._server.stop()
        self.store.close()
        if not self.abandoned:  # an abandoned run may still be inside the engine
            self.models.close()

    def interrupt(self) -> None:
        """A signal ends `run --once`: stop the run at its next checkpoint, recorded as interrupted
        by a signal, and raise KeyboardInterrupt from `run_once` (exit 130). The signal handler
        calls this and then raises KeyboardInterrupt itself, which ends the run at once; the flag
        is for when that exception is lost: a signal handler runs wherever the main thread is, and
        an exception raised inside a finaliser (`__del__`, a weakref callback, which the garbage
        collector may be running at that moment) is printed and dropped, so the run went on, its
        alert fired and the process exited 1 instead of 130."""
        self._interrupted = True
        self._cancel.set()

    @property
    def interrupted(self) -> bool:
        """`interrupt` was called."""
        return self._interrupted

    def run_once(self, names: list[str] | None = None) -> list[RunOutcome]:
        """One run of each monitor (or of `names`), in order, without the scheduler."""
        self.store.open()
        self.store.interrupt_stale_runs()
        mons = [self.config.monitor(n) for n in names] if names else list(self.config.monitors)
        for mon in mons:
            self.metrics.init_monitor(mon.name)
        self.alerts.restore()
        try:  # no tick runs here: what an earlier process's sinks did not take goes out now
            self.alerts.retry_due()
        except TailmonError as exc:
            log.error("undelivered alert notifications not retried: %s", exc)
        try:
            return [self.run_monitor(mon.name) for mon in mons]
        finally:
            # The process ends after this: deliver the notifications now, within the stop bound.
            self.alerts.close(duration_seconds(self.config.shutdown_timeout))
            self.store.close()
            self.models.close()


class _Heartbeat(threading.Thread):
    def __init__(self, store, run_id: int, monitor: str, interval: float):
        super().__init__(name=f"tailmon-heartbeat-{run_id}", daemon=True)
        self.store, self.run_id, self.monitor, self.interval = store, run_id, monitor, interval
        self._done = threading.Event()

    def run(self):
        while not self._done.wait(self.interval):
            try:
                self.store.heartbeat(self.run_id)
                self.store.refresh_lock(self.monitor)
            except TailmonError as exc:
                log.warning("run %d: heartbeat failed: %s", self.run_id, exc)

    def stop(self):
        self._done.set()
        self.join(timeout=5)


def _counts(plan) -> list[int]:
    return allocate(plan.n_samples, [c.share for c in plan.components])


def _samples(report) -> list[dict]:
    out = []
    for i, r in enumerate(report.results):
        lw = r.log_weights
        for k, (text, score) in enumerate(zip(r.responses, r.scores)):
            out.append({"prompt_index": i, "response": text, "score": float(score),
                        "log_weight": None if lw is None or not math.isfinite(lw[k]) else float(lw[k]),
                        "component": int(r.component[k])})
    return out


def _timestamp(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    from datetime import datetime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.timestamp()
