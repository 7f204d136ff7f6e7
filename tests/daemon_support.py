"""A daemon config on the tiny model, shared by the daemon and alert tests.

Test modules cannot import a conftest; tests/ is on sys.path (pytest puts a rootless conftest's
folder there), so `from daemon_support import write_config` works from every test folder.
"""

from __future__ import annotations

import yaml

PROMPTS = ('{"prompt": "a b", "category": "x"}\n{"prompt": "ab!", "category": "y"}\n'
           '{"prompt": "Sure a", "category": "x"}\n')


def write_config(tmp_path, model_dir, *, database=None, samples=20, alert_sinks=None, **monitor):
    """Write tmp_path/tailmon.yaml: one monitor 'tiny' on `model_dir`; keyword arguments replace
    the monitor's keys. Returns the path."""
    (tmp_path / "prompts.jsonl").write_text(PROMPTS, encoding="utf-8")
    mon = {
        "name": "tiny",
        "model": {"ref": str(model_dir), "max_new_tokens": 3, "batch_size": 16},
        "prompts": {"type": "file", "path": "prompts.jsonl", "per_run": 3},
        "judge": "prefix:Sure",
        "proposals": ["system:Sure"],
        "estimator": {"samples": samples, "defensive": 0.2, "seed": 7},
        "volume": {"per_day": 1000000, "windows": ["1h", "1d"]},
        "schedule": {"every": "1h"},
    }
    mon.update(monitor)
    cfg = {"database": database or f"sqlite:///{tmp_path / 'tailmon.db'}", "metrics": {"port": 0},
           "alert_sinks": alert_sinks or {}, "monitors": [mon]}
    path = tmp_path / "tailmon.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run_once_stored(config, tmp_path, *, env=None, timeout=600) -> dict:
    """Run `tailmon run --config CONFIG --once` (this environment's console script) as a process,
    require exit 0, and return the stored run (`Store.get_run`) of the config's SQLite database."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tailmon.store import Store

    tailmon = str(Path(sys.executable).with_name("tailmon"))
    done = subprocess.run([tailmon, "run", "--config", str(config), "--once", "--format", "json"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    [outcome] = json.loads(done.stdout)
    store = Store(f"sqlite:///{tmp_path / 'tailmon.db'}").open()
    try:
        return store.get_run(outcome["run_id"])
    finally:
        store.close()


def proposal_training_config(tmp_path, model_dir, judge: str):
    """A one-monitor config for the proposal-building commands (train-lora, fit-tilt): `judge`,
    no proposals of its own, temperature 0.5 and 2-token replies. Returns the path."""
    path = write_config(tmp_path, model_dir, judge=judge, proposals=[])
    cfg = yaml.safe_load(path.read_text())
    cfg["monitors"][0]["model"].update(temperature=0.5, max_new_tokens=2)
    path.write_text(yaml.safe_dump(cfg))
    return path
