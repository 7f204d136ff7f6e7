"""`engine: vllm` end to end: a monitor whose model runs in an in-process vLLM goes through one
daemon cycle (`tailmon run --once`) and is stored (run by `make test-vllm`).

Cost: one more vLLM load in a subprocess (~1-2 minutes on 2 shared CPU cores) and 3 prompts x 40
samples of 4 tokens.
"""

import os

from daemon_support import run_once_stored, write_config


def test_daemon_run_once_on_vllm(tmp_path):
    config = write_config(tmp_path, "smollm2-135m-instruct", samples=40,
                          model={"ref": "smollm2-135m-instruct", "engine": "vllm", "max_new_tokens": 4},
                          alerts=[{"name": "unreliable-estimate", "enabled": False}])
    run = run_once_stored(config, tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")},
                          timeout=900)
    assert run["status"] == "succeeded"
    assert run["report"]["engine"] == "vllm" and len(run["estimates"]) == 3
    assert all(0 <= e["p_hat"] <= 1 for e in run["estimates"])
