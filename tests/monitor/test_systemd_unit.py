"""config/tailmon.service passes `systemd-analyze verify` and keeps GPUs visible."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_support import write_config  # noqa: E402  (tests/ is on sys.path under pytest)

UNIT = Path(__file__).resolve().parents[2] / "config" / "tailmon.service"


def test_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # verify checks that ExecStart exists: point it at this environment's tailmon.
    text = UNIT.read_text().replace("/opt/tailmon/venv/bin/tailmon", str(Path(sys.executable).with_name("tailmon")))
    unit = tmp_path / "tailmon.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_unit_settings():
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    assert settings["Type"] == ["notify"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["StateDirectory"] == ["tailmon"]
    assert "WatchdogSec" in settings
    assert "PrivateDevices" not in settings  # it would hide /dev/nvidia*
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # The model is pulled into the service's own cache, as its user, from the config it runs.
    [start] = settings["ExecStart"]
    assert settings["ExecStartPre"] == [start.replace(" run --config ", " models pull --config ")]
    assert "TAILMON_CACHE_DIR=/var/cache/tailmon" in settings["Environment"]


def _pull(config: Path, cache: Path) -> subprocess.CompletedProcess:
    """The unit's ExecStartPre, on this environment's tailmon."""
    [pre] = [line.partition("=")[2] for line in UNIT.read_text().splitlines() if line.startswith("ExecStartPre=")]
    argv = pre.replace("/opt/tailmon/venv/bin/tailmon", str(Path(sys.executable).with_name("tailmon"))).split()
    argv[argv.index("--config") + 1] = str(config)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TAILMON_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"})


def test_exec_start_pre_leaves_a_cached_model_alone(tmp_path, tiny_model_dir):
    """Idempotent: every start runs it, and a cached model is neither fetched nor converted again."""
    from tailmon.engines.models import DEFAULT_MODEL, MANIFEST

    cached = tmp_path / "cache" / "models" / DEFAULT_MODEL
    cached.mkdir(parents=True)
    (cached / MANIFEST).write_text("{}")
    second = tmp_path / "second"
    second.mkdir()
    other = write_config(second, tiny_model_dir)  # a local folder: the operator's to provide
    cfg = write_config(tmp_path, tiny_model_dir, model={"ref": DEFAULT_MODEL})
    done = _pull(cfg, tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert f"{DEFAULT_MODEL} is already cached at {cached}" in done.stderr
    assert sorted(p.name for p in cached.iterdir()) == [MANIFEST]
    done = _pull(other, tmp_path / "cache")
    assert done.returncode == 0 and "nothing to pull" in done.stderr, done.stderr
