"""Inputs that cost without bound (issue 18, item 4) end in one line and exit 2, quickly and in little
memory. The bombs run in a child process under RLIMIT_AS and a timeout, so that a regression fails
these tests instead of eating the machine: without the limits, each case below either dies of
MemoryError (exit 1 with a traceback under CliRunner) or runs past the timeout.

One child runs every case (importing tailmon once costs seconds); it reports each case as a JSON
line when it ends, so a case that hangs is named and the ones before it still count.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from tailmon.cli.main import main

# Address space for the child: tailmon with torch imported needs ~1.5 GiB of it; each bomb, left
# alone, asks for tens of GiB (or grows until stopped), and the 256 MiB JSON-list cap fits.
ADDRESS_SPACE = 3 << 30
TIMEOUT = 90  # for all cases together; each takes well under a second once tailmon is imported

CHILD = r"""
import json, sys, time
from click.testing import CliRunner
from tailmon.cli.main import main
for name, args, env in json.loads(sys.argv[1]):
    start = time.monotonic()
    try:
        result = CliRunner().invoke(main, args, env=env)
        out = {"code": result.exit_code, "stderr": result.stderr, "output": result.output}
    except BaseException as exc:  # MemoryError outside click's own handling
        out = {"code": -1, "stderr": repr(exc), "output": ""}
    out.update(name=name, seconds=time.monotonic() - start)
    print(json.dumps(out), flush=True)
"""

ESTIMATE = ["estimate", "--judge", "prefix:S", "--proposal", "temperature:2", "--quiet"]


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    d = tmp_path_factory.mktemp("bombs")
    # Nine levels of ten aliases: 10^9 strings once walked, from 10 lines of YAML.
    levels = ["a0: &a0 ['${HOME}lol', lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    (d / "aliases.yaml").write_text("\n".join(levels) + "\nmonitors: [" + ", ".join(["*a8"] * 10) + "]\n")
    # 200 000 references to a 64 KiB variable: a 800 KB file that substitutes to 12.8 GB.
    (d / "vars.yaml").write_text("monitors: []\nx: '" + "${TAILMON_TEST_BIG}" * 50_000 + "'\n")
    (d / "self.yaml").write_text("a: &a [1, *a]\nmonitors: []\n")
    for name in ("zero.jsonl", "zero.csv"):
        os.symlink("/dev/zero", d / name)
    big = "x" * 65536
    empty_cache = str(d / "cache")  # no model is ever loaded: a case that gets that far fails here
    cases = [
        ("config-aliases", ["config", "validate", str(d / "aliases.yaml")], {}),
        ("config-vars", ["config", "validate", str(d / "vars.yaml")], {"TAILMON_TEST_BIG": big}),
        ("config-self", ["config", "validate", str(d / "self.yaml")], {}),
        ("config-dev-zero", ["config", "validate", "/dev/zero"], {}),
        ("prompts-jsonl-zero", [*ESTIMATE, "--prompts", str(d / "zero.jsonl")], {}),
        ("prompts-csv-zero", [*ESTIMATE, "--prompts", str(d / "zero.csv")], {}),
        ("prompts-json-zero", [*ESTIMATE, "--prompts", "/dev/zero"], {}),
        ("samples", [*ESTIMATE, "--prompt", "hi", "--samples", "1000000000"], {}),
        ("budget", [*ESTIMATE, "--prompt", "hi", "--budget", "1000000000"], {}),
    ]
    env = {**os.environ, "TAILMON_CACHE_DIR": empty_cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cases)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_limit_memory)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    done = {o["name"]: o for o in map(json.loads, stdout.splitlines())}
    return done, stderr[-2000:]


@pytest.mark.parametrize("case, fragment", [
    ("config-aliases", "expands to more than 100000 values"),
    ("config-vars", "expands to more than 100000 values or 10485760 characters"),
    ("config-self", "a YAML alias refers to a collection that contains it"),
    ("config-dev-zero", "/dev/zero: the config file is larger than 1 MiB"),
    ("prompts-jsonl-zero", "zero.jsonl:1: a line longer than 1 MiB"),
    ("prompts-csv-zero", "zero.csv:1: a line longer than 1 MiB"),
    ("prompts-json-zero", "/dev/zero (a JSON list, read whole; JSONL streams) is larger than 256 MiB"),
    ("samples", "--samples must be at most 100000 per prompt, got 1000000000"),
    ("budget", "--budget must be at most 100000 samples per prompt (100000 for 1 prompts)"),
])
def test_a_bomb_is_one_line_and_exit_2(outcomes, case, fragment):
    """Catches each unbounded read or expansion: without its limit the case dies of MemoryError
    under RLIMIT_AS, runs past the timeout, or (samples, budget) gets as far as loading a model."""
    done, stderr = outcomes
    assert case in done, f"{case} did not finish within {TIMEOUT} s (stderr: {stderr})"
    out = done[case]
    lines = [line for line in out["stderr"].splitlines() if line.strip()]
    assert out["code"] == 2 and len(lines) == 1 and "Traceback" not in out["output"], out
    assert fragment in lines[0], lines[0]
    assert out["seconds"] < 5, out


def test_the_cli_and_the_pipeline_agree_on_the_samples_cap():
    """The CLI writes the cap out (so `--help` stays fast): it must be the pipeline's."""
    from tailmon.cli.options import MAX_SAMPLES as CLI_MAX
    from tailmon.estimation.pipeline import MAX_SAMPLES

    assert CLI_MAX == MAX_SAMPLES


def test_a_prompt_past_the_context_is_refused_before_sampling(tiny_model_dir):
    """Catches running a prompt far past the model's context (a 100k-character prompt ran for
    minutes): the tiny model's context is 128 tokens, this prompt renders to ~600."""
    start = time.monotonic()
    result = CliRunner().invoke(main, [*ESTIMATE, "--model", str(tiny_model_dir), "--prompt", "ok",
                                       "--prompt", "ab " * 300, "--max-new-tokens", "4", "--samples", "4"])
    # (transformers' own "Loading weights" progress bar is on stderr too: the error is the one line
    # after it, and the only one tailmon writes)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "prompt 2 of 2 (target): a prompt of " in lines[0]
    assert "max_new_tokens=4 exceed the context of model" in lines[0] and "(128 tokens)" in lines[0]
    assert time.monotonic() - start < 5
