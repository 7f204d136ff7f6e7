"""`tailmon run`: the monitoring daemon, or one run of every monitor (--once)."""

from __future__ import annotations

import json
import os
import signal
import sys

import click

from tailmon.cli.errors import EXIT_FAILED, command
from tailmon.cli.options import config_option
from tailmon.errors import InputError, RuntimeFailure
from tailmon.estimation.render import estimates_table, extrapolation_lines


def _setup_logging(level: str) -> None:
    import logging

    from tailmon.redact import SecretsFilter

    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # no credential reaches the journal, whoever logs it
        handler.addFilter(SecretsFilter())


@command()
@config_option
@click.option("--once", is_flag=True, help="Run every monitor once now, print the figures and exit.")
@click.option("--monitor", "monitor_names", multiple=True, metavar="NAME", help="With --once: only this monitor (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="With --once: how to print the runs' figures.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True,
              help="Least severe log messages written to stderr (the journal under systemd).")
def run(config_path, once, monitor_names, fmt, log_level):
    """Run the monitoring daemon: scheduled estimates, stored runs, Prometheus metrics.

    Serves /metrics and /healthz on the configured address, runs each monitor on its schedule
    (one run at a time per monitor, across every instance sharing the database), and under
    systemd notifies readiness once models are loaded and pings the watchdog. SIGTERM stops it
    (the current run ends within shutdown_timeout or is marked interrupted); SIGHUP reloads the
    config.

    With --once: one run of each monitor, its figures printed, its alert rules evaluated (and
    notified); exit 3 when a run failed, else 1 when an alert rule of a monitor that ran is
    firing afterwards (the estimate failed its check), else 0.

    \b
    Example:
      tailmon run --config config/demo.yaml --once
    """
    from tailmon.monitor.config import load_config
    from tailmon.monitor.daemon import Daemon

    if monitor_names and not once:
        raise InputError("--monitor selects monitors for --once; the daemon runs every configured monitor")
    loaded = load_config(config_path)
    for name in monitor_names:
        loaded.config.monitor(name)
    _setup_logging(log_level)
    daemon = Daemon(loaded, progress=once and sys.stderr.isatty())
    if not once:
        code = daemon.serve()
        if daemon.abandoned:  # a run's thread is stuck in a forward pass: do not wait for it
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)
    # SIGTERM ends a one-shot run as Ctrl-C does: the run is recorded as interrupted (not left
    # 'running' for the next start to clean up) and the process exits 130. The handler raises
    # KeyboardInterrupt where the main thread is and also flags the daemon, whose next checkpoint
    # stops the run should that exception be lost (`Daemon.interrupt` says how).
    def interrupted(signum, frame):
        daemon.interrupt()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    outcomes = daemon.run_once(list(monitor_names) or None)
    if daemon.interrupted:  # a signal whose exception was lost after the last checkpoint: still 130
        raise KeyboardInterrupt
    print_outcomes(outcomes, fmt)
    # A monitor another process held ran nowhere here: --once was asked for a run, so that fails.
    failed = [o for o in outcomes if o.status != "succeeded"]
    if failed:
        raise RuntimeFailure("; ".join(f"monitor {o.monitor}: {_which_run(o)}{o.status}: {o.error}" for o in failed))
    firing = [f"{o.monitor}/{rule}" for o in outcomes for rule in o.firing]
    if firing:
        click.echo(f"alert firing: {', '.join(firing)} (tailmon alerts list --state firing)", err=True)
        sys.exit(EXIT_FAILED)



def print_outcomes(outcomes, fmt) -> None:
    from tailmon.redact import mask_secrets, mask_settings, redact

    reports, errors = {}, {}
    for o in outcomes:  # printed output is exported output: prompts redacted, credentials masked, as stored
        report = mask_settings(o.result.to_dict()) if o.result else None
        errors[id(o)] = mask_secrets(o.error)
        for e in (report or {}).get("estimates", []):
            e["prompt"] = redact(e["prompt"])
        reports[id(o)] = report
    if fmt == "json":
        click.echo(json.dumps([{"monitor": o.monitor, "run_id": o.run_id, "status": o.status, "error": errors[id(o)],
                                "firing_alerts": o.firing, "report": reports[id(o)]} for o in outcomes],
                              indent=2, allow_nan=False))
        return
    for o in outcomes:
        click.echo(f"== monitor {o.monitor}: {_which_run(o)}{o.status}" + (f": {errors[id(o)]}" if o.error else ""))
        report = reports[id(o)]
        if report:
            click.echo(estimates_table(report))
            click.echo(extrapolation_lines(report))
        if o.firing:
            click.echo(f"alerts firing: {', '.join(o.firing)}")


def _which_run(outcome) -> str:
    """'run 12 ' for a stored run; nothing when it never started (no 'run None')."""
    return f"run {outcome.run_id} " if outcome.run_id is not None else ""
