"""benchmarks/gpu.py, the GPU benchmark prepared for a machine without network or weights, kept
from rotting: its measuring core on the tiny model, and the whole script end to end on the CPU
with a one-layer random model from the shipped config (a few seconds)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu  # noqa: E402  (a plain import: a name gone from engines.py must fail here, not skip)

CELLS = ["plain", "IS K=2", "IS K=3", "IS K=4", "IS K=1"]


def test_measure_runs_the_ladder_on_the_tiny_model(make_tiny_engine):
    from engines import Loaded

    # n x tokens large enough that plain generation takes several 10 ms CPU-clock ticks (the ratio
    # in CPU seconds divides by it), small enough for about a second on the tiny model

    rows, info = [], {}
    gpu.measure(Loaded("transformers", make_tiny_engine()), ["a b"], n=32, max_new_tokens=8, seed=0,
                deadline=time.monotonic() + 600, rows=rows, info=info)
    assert [r["cell"] for r in rows] == CELLS
    assert "stopped" not in info
    by_cell = {r["cell"]: r for r in rows}
    # IS rows went through draw: their components are the target plus k-1 system prompts
    for k in (1, 2, 3, 4):
        assert len(by_cell[f"IS K={k}"]["components"]) == k
    summary = {r["cell"]: r for r in gpu.summarise(rows)}
    assert {c: summary[c]["target"] for c in CELLS[1:]} == {"IS K=2": 1.3, "IS K=3": 1.6, "IS K=4": 1.9, "IS K=1": 1.0}
    assert all(summary[c]["ratio"] > 0 for c in CELLS)


def test_measure_stops_at_the_deadline(make_tiny_engine):
    from engines import Loaded

    rows, info = [], {}
    gpu.measure(Loaded("transformers", make_tiny_engine()), ["a b"], n=32, max_new_tokens=8, seed=0,
                deadline=time.monotonic() - 1, rows=rows, info=info)
    assert rows == [] and info["stopped"].startswith("budget")


def test_script_end_to_end_on_the_cpu(tmp_path):
    """Offline, the shipped config with random weights (one layer) and the trivial tokenizer."""
    out = tmp_path / "gpu.json"
    assert gpu.main(["--quick", "--shipped", "--layers", "1", "--n", "4", "--max-new-tokens", "4",
                     "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["complete"] is True and data["dry_run"] is True
    assert data["benchmark"].startswith("DRY RUN on the CPU")
    s = data["settings"]
    assert (s["device"], s["dtype"], s["layers"], s["n"], s["max_new_tokens"]) == ("cpu", "float32", 1, 4, 4)
    assert s["model"].startswith("shipped")
    assert [r["cell"] for r in data["summary"]] == CELLS
    plain = next(r for r in data["results"] if r["cell"] == "plain")
    # random weights almost never end a response (P(<|im_end|>) ~ 1/49152 a step): all run to the end
    assert plain["tokens"] == 4 * 4
    assert {e["engine"]: e.get("skipped", "") for e in data["engines"]}["vllm"].startswith("no CUDA")


def test_script_writes_what_it_has_when_the_budget_runs_out(tmp_path):
    out = tmp_path / "gpu.json"
    # the alarm fires while the model is built (far longer than 1 ms): nothing measured, all written
    gpu.main(["--quick", "--shipped", "--layers", "1", "--device", "cpu", "--budget-s", "0.001", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False and "budget ran out" in data["stopped"]
    assert data["results"] == []


def test_the_summary_of_a_plain_cell_whose_cpu_time_rounds_to_zero():
    """The tiny model's plain cell can take under half a millisecond of CPU time, which the rows
    keep to the millisecond: the summary divided by it (ZeroDivisionError in .ci/run). Its CPU
    ratios are then absent, the wall-clock ones still given."""
    import engines

    def row(cell, k, wall, cpu):
        parts = {f"{p}_{kind}": 0.0 for p in engines.Meter.PARTS for kind in ("wall", "cpu")}
        return {"engine": "transformers", "group": "ladder", "cell": cell, "K": k, "n": 4, "temperature": 1.0,
                "max_new_tokens": 4, "wall": wall, "cpu": cpu, "tokens": 16, "samples": 4, "scored_rows": 4,
                "other_wall": 0.0, "other_cpu": 0.0, **parts}

    out = engines.summarise([row("plain", None, 0.004, 0.0), row("IS K=2", 2, 0.008, 0.001)])
    is_row = next(r for r in out if r["K"] == 2)
    assert is_row["ratio"] == 2.0
    assert is_row["ratio_cpu"] is None and is_row["met_cpu"] is None
