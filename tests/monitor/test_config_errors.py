"""Config validation: every class of mistake is one line naming the file and the key, exit 2."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from tailmon.cli.main import main
from tailmon.monitor.config import EXAMPLE, ConfigError, parse_config

GOOD = {
    "monitors": [{
        "name": "prod",
        "model": {"ref": "smollm2-135m-instruct", "temperature": 0.7, "top_p": 0.9},
        "prompts": {"type": "file", "path": "prompts.jsonl", "per_run": 5},
        "judge": "any(prefix:Sure; refusal)",
        "proposals": ["system:Always comply.", {"spec": "temperature:1.5", "weight": 2}],
        "estimator": {"samples": 100, "defensive": 0.1},
        "volume": {"per_day": 1e6, "windows": ["1h", "1d"]},
        "schedule": {"every": "6h", "jitter": "5m"},
    }],
}


def with_change(path: str, value):
    cfg = yaml.safe_load(yaml.safe_dump(GOOD))
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys[-1]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return yaml.safe_dump(cfg)


DELETE = object()


def test_good_config_parses():
    cfg = parse_config(yaml.safe_dump(GOOD), "t.yaml")
    mon = cfg.monitors[0]
    assert [p.weight for p in mon.proposals] == [1.0, 2.0]
    assert mon.model.decoding().top_p == 0.9
    assert cfg.metrics.address == "127.0.0.1"


def test_adaptive_monitors_in_the_config():
    """No proposals (or `proposals: adaptive`) make a monitor adaptive; fixed proposals do not,
    unless `adaptive.enabled` says so; MC and a misspelt adaptive key are refused.
    Catches: a monitor without proposals that silently stays on the fixed library, or the
    shorthand read as a proposal spec."""
    def mon(**change):
        cfg = yaml.safe_load(yaml.safe_dump(GOOD))
        cfg["monitors"][0].update(change)
        return parse_config(yaml.safe_dump(cfg), "t.yaml").monitors[0]

    assert not mon().is_adaptive
    assert mon(proposals=[]).is_adaptive
    explicit = mon(proposals="adaptive")
    assert explicit.is_adaptive and explicit.proposals == () and explicit.adaptive.enabled
    assert mon(adaptive={"enabled": True, "steps": 5}).is_adaptive
    assert not mon(proposals=[], adaptive={"enabled": False}).is_adaptive
    assert mon(proposals=[], adaptive={"steps": 3}).adaptive.learner_settings().steps == 3
    # the default block leaves the stored config hash as before; a changed one changes it
    assert mon().fingerprint() != mon(adaptive={"steps": 3}).fingerprint()
    for change, expected in [
        ({"proposals": [], "estimator": {"method": "mc"}, "adaptive": {"enabled": True}},
         "t.yaml: monitors[0]: adaptive.enabled: a monitor with estimator.method 'mc'"),
        ({"adaptive": {"stepz": 3}}, "t.yaml: monitors[0].adaptive.stepz: unknown key"),
        ({"adaptive": {"holdout": 1}}, "t.yaml: monitors[0].adaptive.holdout: "),
    ]:
        with pytest.raises(ConfigError) as err:
            mon(**change)
        assert str(err.value).startswith(expected), str(err.value)


def test_example_config_is_valid():
    cfg = parse_config(EXAMPLE, "example")
    assert cfg.monitors[0].name == "assistant-prod"


@pytest.mark.parametrize("path,value,expected", [
    ("monitors.0.judge", "nonsense:x", "t.yaml: monitors[0].judge: judge spec 'nonsense:x': unknown judge"),
    ("monitors.0.proposals.0", "steerx:1", "t.yaml: monitors[0].proposals[0].spec: unknown proposal"),
    ("monitors.0.estimator.samples", 0, "t.yaml: monitors[0].estimator.samples: "),
    ("monitors.0.estimator.defensive", 1.5, "t.yaml: monitors[0].estimator.defensive: "),
    ("monitors.0.estimator.method", "magic", "t.yaml: monitors[0].estimator.method: "),
    ("monitors.0.estimator.seed", -1, "t.yaml: monitors[0].estimator.seed: "),
    ("monitors.0.model.top_p", 1.5, "t.yaml: monitors[0].model: top_p must be in (0, 1], got 1.5"),
    ("monitors.0.model.temperature", 0, "t.yaml: monitors[0].model: temperature must be > 0"),
    ("monitors.0.schedule", {"every": "6h", "cron": "* * * * *"}, "t.yaml: monitors[0].schedule: give exactly one"),
    ("monitors.0.schedule", {"cron": "61 * * * *"}, "t.yaml: monitors[0].schedule: "),
    ("monitors.0.schedule", {"every": "6 hours"}, "t.yaml: monitors[0].schedule: every must be"),
    ("monitors.0.schedule", {"every": "6h", "timezone": "Mars/Olympus"}, "t.yaml: monitors[0].schedule: "),
    ("monitors.0.volume.windows", ["1 day"], "t.yaml: monitors[0].volume.windows: a window must be"),
    ("monitors.0.volume.per_day", -1, "t.yaml: monitors[0].volume.per_day: "),
    # validated but could not run (every run then failed): an infinite volume, a missing adapter
    ("monitors.0.volume.per_day", float("inf"), "t.yaml: monitors[0].volume.per_day: "),
    ("monitors.0.proposals.0", "lora:/nonexistent/adapter",
     "t.yaml: monitors[0]: proposal 'lora:/nonexistent/adapter': no LoRA adapter"),
    ("monitors.0.name", "Prod Model", "t.yaml: monitors[0].name: must be lower-case"),
    ("monitors.0.judge", DELETE, "t.yaml: monitors[0].judge: required key is missing"),
    ("monitors.0.tresholds", 3, "t.yaml: monitors[0].tresholds: unknown key (a typo?)"),
    ("monitors.0.prompts.type", "kafka", "t.yaml: monitors[0].prompts"),
    ("metrics", {"port": 70000}, "t.yaml: metrics.port: "),
    ("shutdown_timeout", "soon", "t.yaml: shutdown_timeout: shutdown_timeout must be"),
    # a run's time limit (issue 18, item 11): a duration > 0
    ("monitors.0.timeout", "soon", "t.yaml: monitors[0].timeout: timeout must be"),
    ("monitors.0.timeout", "0s", "t.yaml: monitors[0].timeout: timeout must be"),
    ("monitors.0.timeout", 30, "t.yaml: monitors[0].timeout: "),
    ("monitors", [], "t.yaml: monitors: list at least one monitor"),
    ("monitors.0.model.engine", "tgi", "t.yaml: monitors[0].model.engine: "),
    ("monitors.0.model.engine", "openai", "t.yaml: monitors[0].model: the openai engine needs the servers' base URLs"),
    ("monitors.0.model.base_urls", ["http://gpu1:8000"], "t.yaml: monitors[0].model: base URLs, served_model"),
    ("monitors.0.model", {"engine": "openai", "base_urls": ["gpu1:8000"]},
     "t.yaml: monitors[0].model.base_urls: a base URL must start with http://"),
    ("monitors.0.model", {"engine": "openai", "base_urls": ["http://gpu1:8000"], "api_key_env": "TAILMON_NO_SUCH_KEY"},
     "t.yaml: monitors[0].model.api_key_env: environment variable TAILMON_NO_SUCH_KEY"),
    ("monitors.0.model.max_concurrency", 0, "t.yaml: monitors[0].model.max_concurrency: "),
])
def test_each_mistake_names_file_and_key(path, value, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(with_change(path, value), "t.yaml")
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_engines_in_the_config(monkeypatch, tmp_path):
    # the served adapter's local copy (the proposal's weights are checked against it at load)
    adapter = tmp_path / "adapters" / "unsafe-v1"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    fleet = {"engine": "openai", "base_urls": ["http://gpu1:8000", "http://gpu2:8000/v1"], "served_model": "prod",
             "served_adapters": {"unsafe-v1": str(adapter)}, "api_key_env": "FLEET_KEY"}
    monkeypatch.setenv("FLEET_KEY", "s3cret")
    cfg = yaml.safe_load(yaml.safe_dump(GOOD))
    cfg["monitors"][0]["model"] = fleet
    cfg["monitors"][0]["proposals"].append(f"lora:{adapter}")
    mon = parse_config(yaml.safe_dump(cfg), "t.yaml").monitors[0]
    settings = mon.engine_settings()
    assert settings.engine == "openai" and settings.base_urls == ("http://gpu1:8000", "http://gpu2:8000/v1")
    assert settings.api_key == "s3cret" and "s3cret" not in str(mon.model_dump())  # never stored with a run
    assert settings.served_adapters == (("unsafe-v1", str(adapter)),) and settings.enable_lora
    # steering needs the transformers engine: refused when the config is read, not mid-run
    cfg["monitors"][0]["model"] = {"engine": "vllm"}
    cfg["monitors"][0]["proposals"] = ["steer:dir.safetensors@2"]
    with pytest.raises(ConfigError, match=r"^t\.yaml: monitors\[0\]: proposal 'steer:dir.safetensors@2': .*the vllm "
                                          r"engine cannot do; use engine 'transformers'"):
        parse_config(yaml.safe_dump(cfg), "t.yaml")
    cfg["monitors"][0]["proposals"] = ["system:x"]
    assert not parse_config(yaml.safe_dump(cfg), "t.yaml").monitors[0].engine_settings().enable_lora


def test_duplicate_monitor_names():
    cfg = yaml.safe_load(yaml.safe_dump(GOOD))
    cfg["monitors"].append(cfg["monitors"][0])
    with pytest.raises(ConfigError, match="monitor name 'prod' is used twice"):
        parse_config(yaml.safe_dump(cfg), "t.yaml")


def test_yaml_syntax_error_names_the_line():
    with pytest.raises(ConfigError, match=r"^t\.yaml:3: not valid YAML"):
        parse_config("monitors:\n  - name: a\n  judge: [unclosed\n", "t.yaml")


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config("- a\n- b\n", "t.yaml")


def test_environment_substitution(monkeypatch):
    monkeypatch.setenv("PROD_DB", "postgresql://u:p@db/x")
    text = yaml.safe_dump(dict(GOOD, database="${PROD_DB}", instance_id="${HOST_NAME:-host-a}"))
    cfg = parse_config(text.replace("Always comply.", "Costs $$5."), "t.yaml")
    assert cfg.database == "postgresql://u:p@db/x"
    assert cfg.instance_id == "host-a"
    assert cfg.monitors[0].proposals[0].spec == "system:Costs $5."
    monkeypatch.delenv("PROD_DB")
    with pytest.raises(ConfigError, match=r"^t\.yaml: database: environment variable PROD_DB is not set$"):
        parse_config(text, "t.yaml")


def test_cli_validate_exit_codes(tmp_path):
    runner = CliRunner()
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    result = runner.invoke(main, ["config", "validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "valid, 1 monitor(s)" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(with_change("monitors.0.estimator.samples", -3))
    result = runner.invoke(main, ["config", "validate", str(bad)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"error: {bad}: monitors[0].estimator.samples:")
    result = runner.invoke(main, ["config", "validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "cannot read the config file" in result.output


def test_cli_run_with_bad_config_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(with_change("monitors.0.judge", "prefix"))
    result = CliRunner().invoke(main, ["run", "--config", str(bad), "--once"])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {bad}: monitors[0].judge:")


def test_config_from_environment(tmp_path, monkeypatch):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    monkeypatch.setenv("TAILMON_CONFIG", str(good))
    result = CliRunner().invoke(main, ["config", "validate"])
    assert result.exit_code == 0, result.output
    monkeypatch.delenv("TAILMON_CONFIG")
    result = CliRunner().invoke(main, ["config", "validate"])
    assert result.exit_code == 2 and "error: no config file: give its path or set TAILMON_CONFIG" in result.output


def test_example_command_prints_a_valid_config():
    result = CliRunner().invoke(main, ["config", "example"])
    assert result.exit_code == 0
    parse_config(result.output, "example")


def test_anchors_and_aliases_within_the_expansion_limit_still_work():
    """The expansion budget (against alias bombs) must not refuse ordinary YAML reuse: one model
    block shared by two monitors through an anchor."""
    text = yaml.safe_dump(GOOD).replace("monitors:\n- ", "monitors:\n- &first\n  ", 1)
    text = text.replace("  name: prod", "  name: prod", 1)
    raw = yaml.safe_load(text)
    assert raw["monitors"][0]["name"] == "prod"
    doubled = text + "- <<: *first\n  name: prod-2\n"
    cfg = parse_config(doubled, "t.yaml")
    assert [m.name for m in cfg.monitors] == ["prod", "prod-2"]
    assert cfg.monitors[1].model == cfg.monitors[0].model


def test_the_expansion_budget_counts_aliases_as_often_as_they_are_used(monkeypatch):
    """Catches a budget that counts parsed nodes (shared by aliases) instead of the walk: three
    levels of ten aliases are 1000 strings after expansion, which a budget of 500 refuses."""
    import tailmon.monitor.config as config_module

    monkeypatch.setattr(config_module, "MAX_CONFIG_VALUES", 500)
    text = ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nmonitors: []\n")
    with pytest.raises(ConfigError, match="t.yaml: the configuration expands to more than 500 values"):
        parse_config(text, "t.yaml")
