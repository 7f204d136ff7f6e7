"""`engine: vllm` end to end: a monitor whose model runs in an in-process vLLM goes through one
daemon cycle (`tailmon run --once`) and is stored (run by `make test-vllm`).

Cost: one more vLLM load in a subprocess (~1-2 minutes on 2 shared CPU cores) and 3 prompts x 40
samples of 4 tokens.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from daemon_support import write_config

from tailmon.monitor.store import Store


def test_daemon_run_once_on_vllm(tmp_path):
    config = write_config(tmp_path, "smollm2-135m-instruct", samples=40,
                          model={"ref": "smollm2-135m-instruct", "engine": "vllm", "max_new_tokens": 4},
                          alerts=[{"name": "unreliable-estimate", "enabled": False}])
    tailmon = str(Path(sys.executable).with_name("tailmon"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    done = subprocess.run([tailmon, "run", "--config", str(config), "--once", "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [outcome] = json.loads(done.stdout)
    store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
    try:
        run = store.get_run(outcome["run_id"])
    finally:
        store.close()
    assert run["status"] == "succeeded"
    assert run["report"]["engine"] == "vllm" and len(run["estimates"]) == 3
    assert all(0 <= e["p_hat"] <= 1 for e in run["estimates"])
