"""Where tailmon keeps things: cache (models, converted weights) and state (database, artefacts).

Both follow the environment first (`TAILMON_CACHE_DIR`, `TAILMON_STATE_DIR`, DESIGN section 8),
then the platform's per-user directories.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    env = os.environ.get("TAILMON_CACHE_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("tailmon"))


def state_dir() -> Path:
    env = os.environ.get("TAILMON_STATE_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_state_dir("tailmon"))


def models_dir() -> Path:
    return cache_dir() / "models"
