"""config/tailmon.service passes `systemd-analyze verify` and keeps GPUs visible."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
