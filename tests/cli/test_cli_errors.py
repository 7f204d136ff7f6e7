"""Bad input never produces a traceback: one line on stderr and exit code 2 (DESIGN section 8).

None of these load a model: input is checked before anything slow happens.
"""

import json

import pytest
from click.testing import CliRunner

from tailmon.cli.main import main

BASE = ["estimate", "--prompt", "hi", "--judge", "prefix:Sure", "--proposal", "temperature:1.5"]


def run(args, **kw):
    return CliRunner().invoke(main, args, **kw)


def one_error_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    text = "\n".join(lines)
    for fragment in fragments:
        assert fragment in text, text
    return text


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model", "no-such-model"], ["unknown model 'no-such-model'"]),
        (["--model", "/nonexistent/dir/model"], ["no such file"]),
        (["--prompts", "/nonexistent/prompts.json"], ["cannot read prompts file"]),
        (["--judge", "regex:["], ["invalid regular expression"]),
        (["--judge", "nosuchjudge"], ["unknown judge"]),
        (["--proposal", "bogus:x"], ["unknown proposal"]),
        (["--proposal", "temperature:hot"], ["must be a number"]),
        (["--proposal", "lora:/nonexistent/adapter"], ["no LoRA adapter"]),
        (["--samples", "0"], ["error: --samples must be an integer >= 1 (per prompt)"]),
        (["--seed", "-1"], ["seed must be an integer >= 0"]),
        (["--temperature", "0"], ["temperature must be > 0"]),
        (["--top-p", "1.5"], ["top_p must be in (0, 1]"]),
        (["--top-k", "-1"], ["top_k must be an integer >= 0"]),
        (["--max-new-tokens", "0"], ["max_new_tokens must be an integer >= 1"]),
        (["--defensive", "1"], ["defensive share must be in [0, 1)"]),
        (["--window", "soon"], ["window"]),
        (["--volume", "-5"], ["--volume must be a finite number >= 0"]),
        (["--volume", "inf"], ["--volume must be a finite number >= 0"]),  # was refused after the estimate
        (["--engine", "openai"], ["the openai engine needs the servers' base URLs"]),
        (["--base-url", "http://gpu1:8000"], ["base URLs, served_model", "are for the openai engine"]),
        (["--engine", "vllm", "--proposal", "steer:d.safetensors@1"], ["use engine 'transformers'"]),
        (["--engine", "openai", "--base-url", "gpu1:8000"], ["must start with http:// or https://"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragments):
    # later options override the BASE ones in click, so each case changes exactly one thing
    one_error_line(run(BASE + args), *fragments)


def test_is_without_proposal_and_mc_with_proposal():
    one_error_line(run(["estimate", "--prompt", "hi", "--judge", "prefix:S"]), "at least one proposal")
    one_error_line(run(BASE + ["--method", "mc"]), "--method mc samples the target only")


def test_no_prompts():
    one_error_line(run(["estimate", "--judge", "prefix:S", "--proposal", "temperature:2"]), "--prompt")


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("p.json", "{not json", "not valid JSON"),
        ("p.json", '{"prompt": "x"}', "expected a JSON list"),
        ("p.json", "[]", "no prompts"),
        ("p.json", '[{"text": "x"}]', "needs one of the fields"),
        ("p.jsonl", '"ok"\n{broken\n', "p.jsonl:2"),
        ("p.csv", "question\nx\n", "'prompt' or 'goal' column"),
        ("p.json", '[""]', "empty"),
    ],
)
def test_malformed_prompt_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    one_error_line(run(["estimate", "--prompts", str(path), "--judge", "prefix:S", "--proposal", "temperature:2"]), fragment)


def test_usage_error_from_click_is_exit_2():
    result = run(["estimate", "--samples", "many"])
    assert result.exit_code == 2


def test_models_list_json(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILMON_CACHE_DIR", str(tmp_path))
    result = run(["models", "list", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["name"] == "smollm2-135m-instruct" and rows[0]["cached"] is False


def test_unknown_embedded_model_pull():
    one_error_line(run(["models", "pull", "gpt-17"]), "unknown embedded model 'gpt-17'")


def test_help_explains_and_has_example():
    for cmd in (["--help"], ["estimate", "--help"], ["models", "pull", "--help"], ["models", "list", "--help"]):
        result = run(cmd)
        assert result.exit_code == 0
    assert "Example" in run(["estimate", "--help"]).output


def test_judges_and_proposals_list():
    judges = run(["judges", "list"])
    assert judges.exit_code == 0
    for syntax in ("prefix:TEXT", "regex:PATTERN", "toxicity[:T]", "any(A; B; ...)", "SPEC>=T"):
        assert syntax in judges.stdout
    proposals = run(["proposals", "list"])
    assert proposals.exit_code == 0
    for syntax in ("system:TEXT", "temperature:T", "lora:PATH[@SCALE]"):
        assert syntax in proposals.stdout


def test_threads_option_and_environment(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        assert run(["--threads", "3", "judges", "list"]).exit_code == 0
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("TAILMON_THREADS", "2")
        assert run(["judges", "list"]).exit_code == 0
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("TAILMON_THREADS", "0")
        result = run(["judges", "list"])
        assert result.exit_code == 2 and "0 is not in the range" in result.output
    finally:
        torch.set_num_threads(before)
