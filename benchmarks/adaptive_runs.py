"""The adaptive monitor against brute force (issue 17): a monitor that names no proposal, run again
and again by `tailmon run --once` on one state folder, each run's mixture read on the 16-token
toxicity reference of tilt.py and lora_hits.py.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adaptive_runs.py   # ~20-40 min per series

**Monitor**: prompt P2 of bruteforce.py with its category (`hate_harassment`, so the library gives
the general and the hate-and-harassment system prompts), the embedded model at temperature 1,
16-token replies, judge `toxicity:T`, 400 samples per run, defensive share 0.1, no proposal named:
the product's defaults (`adaptive:` with only `state_dir`). Each series is a fresh state folder
and database; run 1 draws with the library's mixture (the default monitor before learning), run
r + 1 with what the updates after runs 1..r adopted. A run is the console script as a user runs it,
one process per run; its stored report gives what it drew with and its update.

**Readings of each run**:
* its own estimate (the stored run): p_hat and interval, the reliable flag, z against p_ref
  (both standard errors), whether the interval covers p_ref, and the product's own efficiency
  figure (`mc_sample_ratio`, reported only for reliable estimates);
* its mixture **read on the reference** (`ref_ratio`): the mixture the run drew with (its
  components and shares, the adapter and tilt it used copied before the run, since an update
  prunes the previous generation), scored on every held-out hit of the reference's second half;
  n_MC/n_IS = p(1 - p) / sum_j a_j Var_qj(w h), with E_qj[g] = E_p[g q_j/p] over the target's
  own draws (`reference.mixture_reading`). It does not depend on the run's pool catching the
  heavy hits, and it is read at every threshold (the series learnt for its own).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bruteforce import PROMPTS  # noqa: E402
from common import Cells, Run, markdown_table  # noqa: E402
from reference import mixture_reading  # noqa: E402
from tilt import THRESHOLDS, open_reference, reference_arguments  # noqa: E402

CATEGORY = "hate_harassment"
VERSION = 1


def write_config(folder: Path, prompt: str, threshold: float, args) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.jsonl").write_text(json.dumps({"prompt": prompt, "category": CATEGORY}) + "\n", encoding="utf-8")
    mon = {"name": "adaptive", "model": {"ref": "smollm2-135m-instruct", "max_new_tokens": args.max_new_tokens,
                                         "temperature": 1.0},
           "prompts": {"type": "file", "path": "prompts.jsonl", "per_run": 1},
           "judge": f"toxicity:{threshold}", "estimator": {"samples": args.n, "defensive": 0.1, "seed": args.seed},
           "adaptive": {"state_dir": "learnt"}, "schedule": {"every": "6h"},
           # a run with an unreliable estimate is a result here, not a failure
           "alerts": [{"name": "unreliable-estimate", "enabled": False}]}
    path = folder / "tailmon.yaml"
    path.write_text(yaml.safe_dump({"database": f"sqlite:///{folder / 'tailmon.db'}", "metrics": {"port": 0},
                                    "monitors": [mon]}), encoding="utf-8")
    return path


def one_run(folder: Path, config: Path, r: int) -> dict:
    """Run r of a series: the learnt state copied aside first (what this run draws with), then
    `tailmon run --once` as a process, then its stored run."""
    from tailmon.store import Store

    learnt, before = folder / "learnt", folder / f"state-before-{r}"
    shutil.rmtree(before, ignore_errors=True)
    if learnt.exists():
        shutil.copytree(learnt, before)
    tailmon = str(Path(sys.executable).with_name("tailmon"))
    start = time.perf_counter()
    done = subprocess.run([tailmon, "run", "--config", str(config), "--once", "--format", "json"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "TAILMON_STATE_DIR": str(folder / "state")}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"run {r} in {folder} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    [outcome] = json.loads(done.stdout)
    store = Store(f"sqlite:///{folder / 'tailmon.db'}").open()
    try:
        stored = store.get_run(outcome["run_id"])
    finally:
        store.close()
    return {"run": r, "seconds": round(seconds, 1), "report": stored["report"], "state_before": str(before)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    reference_arguments(parser, "/tmp/tailmon-bench-adaptive", "adaptive_runs.json")
    parser.add_argument("--thresholds", default="0.5,0.9", help="one series per threshold (the monitor's judge)")
    parser.add_argument("--series", type=int, default=1, help="independent series per threshold")
    parser.add_argument("--runs", type=int, default=6, help="runs per series (run 1: before any learning)")
    parser.add_argument("--n", type=int, default=400, help="samples per run")
    args = parser.parse_args(argv)
    ref, half = open_reference(args)
    tox_ref = ref["toxicity"][half:]
    prompt = PROMPTS[args.prompt]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    settings = {"model": "smollm2-135m-instruct (embedded, float32, CPU)", "prompt": prompt, "category": CATEGORY,
                "temperature": 1.0, "max_new_tokens": args.max_new_tokens, "thresholds": thresholds,
                "series": args.series, "runs": args.runs, "n": args.n, "defensive": 0.1,
                "adaptive": "product defaults", "reference": args.reference,
                "reference_split": "p_ref and the readings from cells 15..29 (the second half)"}
    run = Run("adaptive_runs", "adaptive_runs: the adaptive monitor's successive runs against brute force, toxicity "
              "judge, 16-token replies", seed=args.seed, settings=settings)
    args.work.mkdir(parents=True, exist_ok=True)
    cells = Cells(args.work)

    # -- the series: one process per run, each run's stored report kept as a cell
    series = {}
    for thr in thresholds:
        for s in range(args.series):
            folder = args.work / f"toxicity{thr}-series{s}-n{args.n}-v{VERSION}"
            config = write_config(folder, prompt, thr, argparse.Namespace(**{**vars(args), "seed": args.seed + s}))
            rows = []
            for r in range(1, args.runs + 1):
                cell = folder / f"run-{r}.json"
                if not cell.exists():
                    row = one_run(folder, config, r)
                    tmp = cell.with_suffix(".tmp")
                    tmp.write_text(json.dumps(row), encoding="utf-8")
                    os.replace(tmp, cell)
                    print(f"[adaptive] toxicity>={thr} series {s} run {r}: {row['seconds']:.0f} s, p_hat "
                          f"{row['report']['estimates'][0]['p_hat']:.3g}, reliable "
                          f"{row['report']['estimates'][0]['reliable']}", flush=True)
                rows.append(json.loads(cell.read_text(encoding="utf-8")))
            series[(thr, s)] = (folder, rows)

    # -- each run's mixture read on the reference's held-out hits
    from tailmon.engines.base import Decoding, Variant
    from tailmon.engines.transformers_engine import TransformersEngine
    from tailmon.proposals import parse_proposal

    engine = TransformersEngine.load(None, batch_size=128)
    target = Variant("target", Decoding(temperature=1.0, max_new_tokens=args.max_new_tokens))
    any_hit = np.flatnonzero(tox_ref >= min(THRESHOLDS))
    hits = [list(map(int, ref["ids"][half + i][: ref["lengths"][half + i]])) for i in any_hit]
    log_p = engine.score(prompt, target, hits)

    def log_f(label: str, folder: Path, before: str) -> list[float]:
        """log q/p of every held-out hit under one component, its adapter or tilt read from the
        copy taken before the run (an update prunes the generation it replaces)."""
        spec = label.replace(str(folder / "learnt"), before)

        def job():
            variant = parse_proposal(spec).variant(target)
            return {"log_f": (engine.score(prompt, variant, hits) - log_p).tolist()}
        return cells.get_or_run(["log_f", VERSION, args.prompt, args.max_new_tokens, spec,
                                 _digest(Path(before))], job)["log_f"]

    results, summary = [], []
    for (thr, s), (folder, rows) in series.items():
        for row in rows:
            rep = row["report"]
            est = rep["estimates"][0]
            comps = rep["components"]
            shares = np.array([c["share"] for c in comps])
            lf = np.array([np.zeros(len(hits)) if c["label"] == "target"
                           else log_f(c["label"], folder, row["state_before"]) for c in comps]).T  # (hits, components)
            update = (rep.get("adaptive") or {}).get("update") or {}
            base = {"judge": f"toxicity>={thr}", "series": s, "run": row["run"], "seconds": row["seconds"],
                    "generation": rep["adaptive"]["generation"], "components": [c["label"][:60] for c in comps],
                    "shares": shares.tolist(), "adapter": rep["adaptive"]["adapter"] is not None,
                    "tilt": rep["adaptive"]["tilt"] is not None, "update": {k: update.get(k) for k in (
                        "adopted", "reason", "candidate", "generation_after", "seconds")}}
            p_own = float(np.mean(tox_ref >= thr))
            se = math.sqrt((est["std_error"] or 0.0) ** 2 + p_own * (1 - p_own) / len(tox_ref))
            own = {"hits": est["n_harmful"], "p_hat": est["p_hat"], "ci": [est["ci_low"], est["ci_high"]],
                   "covered": bool(est["ci_low"] <= p_own <= est["ci_high"]), "reliable": bool(est["reliable"]),
                   "ess_wh": est["ess_wh"], "z": (est["p_hat"] - p_own) / se if se > 0 else None,
                   "mc_sample_ratio": est.get("mc_sample_ratio")}
            readings = {}
            for t in THRESHOLDS:
                h = tox_ref[any_hit] >= t
                readings[f"toxicity>={t}"] = mixture_reading(lf[h], shares, len(tox_ref))
            results.append({**base, "p_ref": p_own, "own": own, "reference_readings": readings})
            read = readings[f"toxicity>={thr}"]
            summary.append({"judge": f"toxicity>={thr}", "p_ref": p_own, "series": s, "run": row["run"],
                            "generation": base["generation"],
                            "learnt": "+".join(k for k in ("adapter", "tilt") if base[k]) or "none",
                            "hits": own["hits"], "p_hat": own["p_hat"], "z": own["z"], "covered": own["covered"],
                            "reliable": own["reliable"], "ess_wh": own["ess_wh"],
                            "mc_sample_ratio": own["mc_sample_ratio"], "ref_ratio": read["ratio"],
                            "update": "adopted" if base["update"]["adopted"] else (base["update"]["reason"] or "")[:40],
                            "seconds": row["seconds"]})
    print(markdown_table(summary, ["judge", "p_ref", "series", "run", "generation", "learnt", "hits", "p_hat", "z",
                                   "covered", "reliable", "ess_wh", "mc_sample_ratio", "ref_ratio", "update", "seconds"],
                         {"p_ref": ".2e", "p_hat": ".2e", "z": "+.1f", "ess_wh": ".1f", "mc_sample_ratio": ".2f",
                          "ref_ratio": ".2f", "seconds": ".0f"}))
    notes = ("One row per run. own: the run's stored estimate at its monitor's threshold against p_ref (the "
             "reference's second half); mc_sample_ratio is the product's figure (reliable estimates only). "
             "ref_ratio: n_MC/n_IS of the mixture the run drew with, computed on the reference's held-out draws "
             "(reference.mixture_reading), independent of the run's pool. Run 1 is the default monitor before "
             "learning; run r+1 uses what r updates adopted.")
    out = run.write(summary=summary, results=results, notes=notes, out=args.out)
    print(f"wrote {out}")
    return 0


def _digest(folder: Path) -> str:
    """A content hash of the copied state (adapter and tilt files; none before the first run), so
    a reading cell belongs to the files it read, not to a folder name reused by another series."""
    import hashlib

    h = hashlib.sha1()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    raise SystemExit(main())
