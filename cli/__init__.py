"""tailmon.cli: the `tailmon` command line, a thin click layer over the library.

`main` is the root group; each command group has a module of its own (models, judges, proposals,
estimate, config, daemon (`run`), runs, alerts, check (`check`, `sensitivity`)); `options` holds
the options and helpers several commands share; `errors` is the one place that maps errors to exit
codes and puts flag names into library messages.
"""
