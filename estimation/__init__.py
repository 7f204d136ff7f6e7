"""tailmon.estimation: the one code path from settings to a run's result.

* `settings`: typed settings of an estimation (model and decoding, judge, proposals, estimator,
  volume, prompt source); the daemon's YAML schema is built from them.
* `prompts`, `sources`: prompt files and the daemon's prompt sources (file, log directory, SQL),
  with stratified, reproducible draws.
* `plan`: the plan builder (`build_plan`, `plan_for_monitor`) every command goes through.
* `pipeline`: draw, score, weight, judge and estimate each prompt (`run_estimation`).
* `budget`: a total sample budget spread over prompts by a pilot.
* `result`: the run's typed result and the figures metrics and alerts read.
* `render`: the estimates table people read.
"""
