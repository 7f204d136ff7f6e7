"""Where tailmon keeps things: cache (models, converted weights) and state (database, artefacts).

Both follow the environment first (`TAILMON_CACHE_DIR`, `TAILMON_STATE_DIR`, DESIGN section 8),
then the platform's per-user directories.
"""

from __future__ import annotations

import os
import stat
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


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` all at once: written to a temporary file beside it, flushed to
    disk, then renamed over it. A full disk or a crash leaves the previous file as it was (an
    `open(path, "w")` had already emptied it), never a truncated one; OSError on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        try:  # the replaced file keeps its permissions (a report kept private stays private)
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
