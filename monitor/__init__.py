"""tailmon.monitor: the daemon (`tailmon run`).

* `config`: the YAML configuration (monitors, schedules, alert rules and sinks, metrics address)
  with `${VAR}` substitution and one-line errors.
* `daemon`: the scheduler, model pool, one run of a monitor from prompts to stored result, alert
  evaluation, reload on SIGHUP and graceful stop on SIGTERM.
* `metrics`: the Prometheus exposition and /healthz.
* `systemd`: readiness and watchdog notifications.
"""
