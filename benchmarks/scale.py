"""Scale: how one estimation run's time and memory grow with prompts, samples per prompt and
max_new_tokens, and the daemon's resident memory between runs (recorded, not asserted).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scale.py            # writes results/scale.json + PNGs
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scale.py --quick    # fewer points, 3 daemon runs

**Estimation runs.** One `tailmon.estimation.pipeline.run_estimation` on the embedded model
(`TransformersEngine.load()`, SmolLM2-135M-Instruct, float32, batch size 64 as shipped) with an
importance-sampling plan: the deployed model (temperature 1, no truncation) and one proposal
`system:Start every answer with the word: Sure` at defensive share 0.1, judge `toxicity`.
The judge is `toxicity` rather than a rule judge because it reads the whole response (a prefix
judge on 128 tokens would be an odd workload) while costing well under a millisecond per
response (results/judges.json), so it does not hide the model's cost; its fixed memory (the
profanity model and scikit-learn) is measured apart. Prompts are AdvBench behaviours from
`data/proposals_prompts.json` (`evaluate` then `lora_train`, in order).

One factor varies at a time around a base point (1 prompt, 32 samples per prompt,
max_new_tokens 16): prompts 1, 2, 4, 8; samples 16, 32, 64, 128; max_new_tokens 8, 16, 32, 64
(`--quick`: the first two values of each). The sizes are small because one CPU thread generates
only about 15-20 tokens a second for the whole batch here (a 32-sample point takes half a
minute); the engine samples in batches of 64, so 128 samples cross one batch boundary. The base point is measured twice (first and last), which shows the run-to-run noise of the
shared machine. Each point runs in a fresh subprocess (`scale.py --point JSON`, one torch
thread) so that its memory figures are its own:

* `rss_import_mb`: VmRSS after importing torch and tailmon; `rss_model_mb`: after
  `TransformersEngine.load()` (the safetensors weights are memory-mapped, so most are not yet
  resident); `rss_judge_mb`: after the judge scored one warm-up pair (the profanity model
  loaded); `rss_ready_mb`: after one 1-sample warm-up draw (every weight paged in, lazy one-off
  allocations done), split into anonymous and file-backed pages: the baseline before the run.
* `peak_run_mb`: the peak RSS of the estimation alone: the kernel's high-water mark (VmHWM) is
  reset (`echo 5 > /proc/self/clear_refs`) just before `run_estimation` and read after it.
  `getrusage(RUSAGE_SELF).ru_maxrss` is read before the reset (`maxrss_before_run_mb`: the peak
  of loading and warm-up) and at the end (`maxrss_mb`; the kernel resets it with VmHWM, so it is
  the run's peak too, or the last phase's with the phase resets below); the process's peak is the
  larger of the two. `rss_end_mb` is the VmRSS after the run.
* `wall_s`: wall seconds of `run_estimation` alone (model load and warm-up excluded), with the
  seconds inside `engine.sample`, `engine.score` and `judge.score` (the engine's and judge's
  methods wrapped with timers; the rest is weights and estimators). `tokens` is the number of
  generated tokens (responses stop at end-of-turn, so it can be below samples x max_new_tokens;
  a batch runs until its longest response ends). Load averages before and after each point.

Where the peak is: two points (64 samples x 16 tokens, 32 samples x 64 tokens) are measured again
in fresh processes with VmHWM reset around every `engine.sample`, `engine.score` and `judge.score`
call, giving each phase's peak (`peak_sample_mb`, `peak_score_mb`, `peak_judge_mb`), and with
`cpu_s`, the process CPU seconds of the run (less sensitive than wall time to other jobs on shared
cores; the sweep rows, measured first, lack it).

Growth is fitted from the numbers: least squares of wall seconds on the varied factor (a line:
seconds per prompt, per sample, per token), and the log-log slope between the smallest and
largest value (1: linear).

**Daemon.** A real daemon, `.venv/bin/tailmon run --config FILE` (the console script), in a
temporary folder with a SQLite state dir (`TAILMON_STATE_DIR`), metrics on a free port, one
monitor on the embedded model (1 prompt per run, drawn from 8, 16 samples, max_new_tokens 8, judge
`toxicity`, the same proposal, `schedule: {every: 30s}`, the built-in alert off), `OMP_NUM_THREADS=1`. Every second the
parent reads VmRSS and VmHWM from /proc/PID/status and `tailmon_run_in_progress` from /metrics;
after `--daemon-runs` finished runs it sends SIGTERM and reads the `runs` table. Reported: the RSS
once the models are loaded (before the first run), the RSS just before each run starts and just
after it ends, and the least-squares growth per run of the between-runs RSS from the second run
on (a leak shows as steady growth; the first run's one-off allocations are reported apart).

Cells (one per point) are kept under `--work` (default /tmp/tailmon-bench-scale) and reused by
a rerun with the same settings; `--fresh` ignores them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import Cells, Run, load_average, markdown_table  # noqa: E402  (the shared results format)

SEED = 0
PROPOSAL = "system:Start every answer with the word: Sure"
JUDGE = "toxicity"
DEFENSIVE = 0.1
BASE = {"prompts": 1, "samples": 32, "max_new_tokens": 16}
SWEEPS = {"prompts": [1, 2, 4, 8], "samples": [16, 32, 64, 128], "max_new_tokens": [8, 16, 32, 64]}
QUICK_SWEEPS = {"prompts": [1, 2], "samples": [16, 32], "max_new_tokens": [8, 16]}
# Where the peak is: these points again, with the peak RSS of each phase (sample, score, judge).
PHASE_POINTS = [{"prompts": 1, "samples": 64, "max_new_tokens": 16}, {"prompts": 1, "samples": 32, "max_new_tokens": 64}]
QUICK_PHASE_POINTS = [dict(BASE)]
DAEMON = {"prompts_per_run": 1, "samples": 16, "max_new_tokens": 8, "every": "30s"}


def prompts_all() -> list[str]:
    data = json.loads((HERE / "data" / "proposals_prompts.json").read_text(encoding="utf-8"))
    return list(data["evaluate"]) + list(data["lora_train"])


# -- memory readings ------------------------------------------------------------------------------

def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, ... of a process in MiB (from /proc/PID/status)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("Vm", "Rss")) and line.endswith("kB"):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024
    except (OSError, ValueError):
        pass
    return out


def reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# -- one point, in its own process ----------------------------------------------------------------

def run_point(point: dict) -> dict:
    """Measure one estimation run (called in a fresh process by `--point`)."""
    t_start = time.perf_counter()

    sys.path.insert(0, str(HERE))
    from common import one_torch_thread

    threads = one_torch_thread()
    from tailmon.engines.base import Decoding, Variant
    from tailmon.engines.transformers_engine import TransformersEngine
    from tailmon.judges import parse_judge
    from tailmon.estimation.pipeline import EstimationPlan, run_estimation
    from tailmon.estimation.prompts import PromptItem
    from tailmon.proposals import parse_proposal

    row = {**point, "torch_threads": threads, "load_before": load_average()}
    row["rss_import_mb"] = proc_status()["VmRSS"]
    t = time.perf_counter()
    engine = TransformersEngine.load()
    row["load_s"] = time.perf_counter() - t
    row["rss_model_mb"] = proc_status()["VmRSS"]
    judge = parse_judge(JUDGE)
    target = Variant("target", Decoding(max_new_tokens=point["max_new_tokens"]))
    plan = EstimationPlan(target=target, judge=judge, method="is", proposals=[parse_proposal(PROPOSAL)],
                          defensive=DEFENSIVE, n_samples=point["samples"], seed=SEED)
    # Warm-up: the judge's model, and one tiny draw so lazy one-off allocations are not the run's.
    judge.score(["warm-up"], ["warm-up"])
    row["rss_judge_mb"] = proc_status()["VmRSS"]
    engine.sample("warm-up", target, 1, 0)  # the first forward pass pages the mmapped weights in
    judge.new_run()
    st = proc_status()
    row["rss_ready_mb"], row["rss_ready_anon_mb"], row["rss_ready_file_mb"] = st["VmRSS"], st["RssAnon"], st["RssFile"]
    row["maxrss_before_run_mb"] = maxrss_mb()

    timers = {"sample": 0.0, "score": 0.0, "judge": 0.0}
    phase_peak = {"sample": 0.0, "score": 0.0, "judge": 0.0}
    phases = bool(point.get("phases"))
    tokens = []

    def timed(name, fn, on_result=None):
        def wrapper(*args, **kwargs):
            if phases:  # the peak RSS inside this call alone (every heavy step is inside one)
                reset_hwm()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            timers[name] += time.perf_counter() - t0
            if phases:
                phase_peak[name] = max(phase_peak[name], proc_status()["VmHWM"])
            if on_result:
                on_result(out)
            return out
        return wrapper

    engine.sample = timed("sample", engine.sample, lambda s: tokens.extend(len(r) for r in s.token_ids))
    engine.score = timed("score", engine.score)
    judge.score = timed("judge", judge.score)

    prompts = [PromptItem(p, "advbench") for p in prompts_all()[: point["prompts"]]]
    row["hwm_reset"] = reset_hwm()
    t, cpu = time.perf_counter(), time.process_time()
    report = run_estimation(engine, plan, prompts)
    row["wall_s"] = time.perf_counter() - t
    row["cpu_s"] = time.process_time() - cpu
    status = proc_status()
    row["peak_run_mb"] = status["VmHWM"] if row["hwm_reset"] else None
    if phases:  # VmHWM was reset inside the run: its peak is the largest of the phases' and the tail's
        row["peak_run_mb"] = max(row["peak_run_mb"], *phase_peak.values())
        row.update({f"peak_{k}_mb": v for k, v in phase_peak.items()})
    row["rss_end_mb"] = status["VmRSS"]
    row["rss_end_anon_mb"] = status["RssAnon"]
    row["maxrss_mb"] = maxrss_mb()
    row.update({f"{k}_s": v for k, v in timers.items()})
    row["other_s"] = row["wall_s"] - sum(timers.values())
    row["n_samples_total"] = len(tokens)
    row["tokens"] = int(sum(tokens))
    row["mean_len"] = sum(tokens) / len(tokens)
    row["max_len"] = max(tokens)
    row["ms_per_token"] = 1000 * row["wall_s"] / max(row["tokens"], 1)
    agg = report.aggregate()
    row["p_hat"] = float(agg.p_hat)
    row["load_after"] = load_average()
    row["process_s"] = time.perf_counter() - t_start
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}


def measure_point(point: dict) -> dict:
    """Run one point in a fresh interpreter and return its row."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(point)],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"point {point} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["subprocess_s"] = round(time.perf_counter() - t, 1)
    return row


# -- the daemon ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_running(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("tailmon_run_in_progress{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def measure_daemon(n_runs: int, log) -> dict:
    """Start `tailmon run`, sample its RSS every second over n_runs runs, stop it with SIGTERM."""
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="tailmon-bench-scale-daemon-"))
    state = tmp / "state"
    state.mkdir()
    (tmp / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "category": "advbench"}) + "\n" for p in prompts_all()[:8]),
        encoding="utf-8")
    port = free_port()
    cfg = {
        "metrics": {"address": "127.0.0.1", "port": port},
        "monitors": [{
            "name": "scale",
            "model": {"ref": "smollm2-135m-instruct", "max_new_tokens": DAEMON["max_new_tokens"]},
            "prompts": {"type": "file", "path": "prompts.jsonl", "per_run": DAEMON["prompts_per_run"]},
            "judge": JUDGE,
            "proposals": [PROPOSAL],
            "estimator": {"method": "is", "samples": DAEMON["samples"], "defensive": DEFENSIVE, "seed": SEED},
            "volume": {"per_day": 1000000, "windows": ["1d"]},
            "schedule": {"every": DAEMON["every"]},
            "alerts": [{"name": "unreliable-estimate", "enabled": False}],
        }],
    }
    config = tmp / "tailmon.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TAILMON_STATE_DIR": str(state)}
    env.pop("TAILMON_DATABASE_URL", None)
    env.pop("TAILMON_CONFIG", None)
    exe = ROOT / ".venv" / "bin" / "tailmon"
    log_path = tmp / "daemon.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([str(exe), "run", "--config", str(config)], env=env, cwd=tmp,
                                stdout=log_file, stderr=subprocess.STDOUT)
    log(f"daemon pid {proc.pid}, config {config}, log {log_path}")
    t0 = time.time()
    trace = []  # (t, rss, hwm, running)
    finished = 0
    prev_running = 0.0
    deadline = t0 + 60 + n_runs * 120
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited early ({proc.returncode}); see {log_path}")
            st = proc_status(proc.pid)
            running = metrics_running(port)
            if st:
                trace.append({"t": round(time.time() - t0, 2), "rss_mb": round(st.get("VmRSS", 0), 1),
                              "hwm_mb": round(st.get("VmHWM", 0), 1), "running": running})
            if prev_running == 1.0 and running == 0.0:
                finished += 1
                log(f"daemon run {finished}/{n_runs} done at {trace[-1]['t']:.0f} s, RSS {trace[-1]['rss_mb']:.0f} MiB")
                if finished >= n_runs:
                    time.sleep(2)  # one more reading between runs
                    st = proc_status(proc.pid)
                    trace.append({"t": round(time.time() - t0, 2), "rss_mb": round(st.get("VmRSS", 0), 1),
                                  "hwm_mb": round(st.get("VmHWM", 0), 1), "running": metrics_running(port)})
                    break
            if running is not None:
                prev_running = running
            time.sleep(1.0)
        else:
            raise RuntimeError(f"the daemon finished {finished} of {n_runs} runs in time; see {log_path}")
    finally:
        t_stop = time.time()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        stop_s = time.time() - t_stop
    runs = []
    db = state / "tailmon.db"
    if db.is_file():
        con = sqlite3.connect(db)
        con.row_factory = sqlite3.Row
        cols = [r[1] for r in con.execute("PRAGMA table_info(runs)")]
        keep = [c for c in ("id", "status", "started_at", "finished_at", "timings") if c in cols]
        runs = [dict(r) for r in con.execute(f"SELECT {', '.join(keep)} FROM runs ORDER BY id")]
        con.close()
    return {"config": cfg, "trace": trace, "runs": runs, "exit_code": code, "stop_s": round(stop_s, 1),
            "log_tail": log_path.read_text(errors="replace").splitlines()[-15:], "folder": str(tmp)}


def summarise_daemon(d: dict) -> dict:
    """RSS before the first run, just before / after each run, and growth per run."""
    trace = d["trace"]
    episodes = []  # (start index, end index) of each run, from the running flag
    start = None
    for i, s in enumerate(trace):
        if s["running"] == 1.0 and start is None:
            start = i
        elif s["running"] == 0.0 and start is not None:
            episodes.append((start, i))
            start = None
    first = episodes[0][0] if episodes else len(trace)
    loaded = [s["rss_mb"] for s in trace[:first] if s["running"] is not None]
    per_run = []
    for k, (a, b) in enumerate(episodes):
        before = trace[a - 1]["rss_mb"] if a > 0 else None
        during = max(s["rss_mb"] for s in trace[a:b]) if b > a else None
        # between runs: the last reading before the next run starts (or the last reading at all)
        nxt = episodes[k + 1][0] if k + 1 < len(episodes) else len(trace)
        after = trace[nxt - 1]["rss_mb"]
        per_run.append({"run": k + 1, "rss_before_mb": before, "rss_peak_during_mb": during,
                        "rss_after_mb": after, "hwm_after_mb": trace[nxt - 1]["hwm_mb"],
                        "duration_s": round(trace[b]["t"] - trace[a]["t"], 1)})
    out = {"rss_loaded_mb": loaded[-1] if loaded else None, "runs": per_run}
    after = [r["rss_after_mb"] for r in per_run]
    if after:
        out["rss_after_first_run_mb"] = after[0]
        out["rss_after_last_run_mb"] = after[-1]
    if len(after) >= 3:
        import numpy as np

        x = np.arange(2, len(after) + 1, dtype=float)
        slope = np.polyfit(x, np.asarray(after[1:]), 1)[0]
        out["growth_mb_per_run_after_first"] = round(float(slope), 2)
        out["growth_first_to_last_mb"] = round(after[-1] - after[0], 1)
    return out


# -- fits, plots, README ---------------------------------------------------------------------------

def fit(rows: list[dict], factor: str, y: str) -> dict:
    import numpy as np

    x = np.array([r[factor] for r in rows], dtype=float)
    v = np.array([r[y] for r in rows], dtype=float)
    slope, intercept = np.polyfit(x, v, 1)
    pred = slope * x + intercept
    ss = float(((v - v.mean()) ** 2).sum())
    r2 = 1 - float(((v - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    lo, hi = np.argmin(x), np.argmax(x)
    exponent = float(np.log(v[hi] / v[lo]) / np.log(x[hi] / x[lo])) if v[lo] > 0 and v[hi] > 0 else None
    return {"factor": factor, "y": y, "slope": round(float(slope), 4), "intercept": round(float(intercept), 3),
            "r2": round(r2, 4), "loglog_exponent": None if exponent is None else round(exponent, 3)}


def plots(sweeps: dict[str, list[dict]], daemon: dict | None, summary_daemon: dict | None,
          folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    labels = {"prompts": "prompts", "samples": "samples per prompt", "max_new_tokens": "max_new_tokens"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (factor, rows) in zip(axes, sweeps.items()):
        x = [r[factor] for r in rows]
        ax.plot(x, [r["wall_s"] for r in rows], "o-", label="run (wall)")
        ax.plot(x, [r["sample_s"] for r in rows], "s--", label="engine.sample")
        ax.plot(x, [r["score_s"] for r in rows], "^--", label="engine.score")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(labels[factor])
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"tailmon: one estimation run (IS, 1 proposal, judge {JUDGE}), SmolLM2-135M, 1 CPU thread; "
                 f"base {BASE['prompts']} prompt(s) x {BASE['samples']} samples x {BASE['max_new_tokens']} tokens",
                 fontsize=9)
    fig.tight_layout()
    out = folder / "scale_time.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    written.append(str(out))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (factor, rows) in zip(axes, sweeps.items()):
        x = [r[factor] for r in rows]
        ax.plot(x, [r["peak_run_mb"] for r in rows], "o-", label="peak during the run (VmHWM)")
        ax.plot(x, [r["rss_ready_mb"] for r in rows], "s--", label="before the run (model paged in + judge)")
        ax.plot(x, [r["rss_end_mb"] for r in rows], "^:", label="after the run")
        ax.plot(x, [r["rss_import_mb"] for r in rows], "x:", label="after imports")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(labels[factor])
        ax.set_ylabel("RSS, MiB")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("tailmon: resident memory of one estimation run (fresh process per point)", fontsize=9)
    fig.tight_layout()
    out = folder / "scale_memory.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    written.append(str(out))

    if daemon and daemon["trace"]:
        tr = daemon["trace"]
        fig, ax = plt.subplots(figsize=(9, 3.8))
        t = [s["t"] for s in tr]
        ax.plot(t, [s["rss_mb"] for s in tr], "-", label="VmRSS")
        ax.plot(t, [s["hwm_mb"] for s in tr], ":", label="VmHWM (peak)")
        ymax = max(s["hwm_mb"] for s in tr)
        on = [s["running"] == 1.0 for s in tr]
        ax.fill_between(t, 0, ymax * 1.05, where=on, step="post", alpha=0.15, color="tab:orange",
                        label="run in progress")
        ax.set_xlabel("seconds since the daemon started")
        ax.set_ylabel("MiB")
        ax.set_ylim(0, ymax * 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"tailmon run (daemon): resident memory over {len(summary_daemon['runs'])} runs "
                     f"(every {DAEMON['every']}, {DAEMON['prompts_per_run']} prompt(s) x {DAEMON['samples']} samples "
                     f"x {DAEMON['max_new_tokens']} tokens)", fontsize=9)
        fig.tight_layout()
        out = folder / "scale_daemon.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(str(out))
    return written


# -- main ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one point in this process
    ap.add_argument("--quick", action="store_true", help="2 values per factor, 3 daemon runs")
    ap.add_argument("--daemon-runs", type=int, default=None, help="daemon runs to watch (default 7, quick 3)")
    ap.add_argument("--no-daemon", action="store_true")
    ap.add_argument("--work", default="/tmp/tailmon-bench-scale")
    ap.add_argument("--fresh", action="store_true", help="ignore finished cells under --work")
    ap.add_argument("--out", default=None, help="results file (default results/scale.json)")
    ap.add_argument("--readme", default=None,
                    help="where to write the generated tables in markdown (default WORK/readme-tables.md)")
    args = ap.parse_args(argv)

    if args.point:
        print(json.dumps(run_point(json.loads(args.point))), flush=True)
        return 0

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    sweeps_def = QUICK_SWEEPS if args.quick else SWEEPS
    daemon_runs = args.daemon_runs or (3 if args.quick else 7)
    settings = {"model": "smollm2-135m-instruct (embedded, float32, batch_size 64)", "judge": JUDGE,
                "proposal": PROPOSAL, "defensive": DEFENSIVE, "decoding": "temperature 1, top_p 1, top_k 0",
                "base": BASE, "sweeps": sweeps_def, "base_repeats": 2, "daemon": {**DAEMON, "runs": daemon_runs},
                "prompts": "benchmarks/data/proposals_prompts.json: evaluate + lora_train, in order"}
    run = Run("scale", "time and memory of one estimation run vs prompts, samples, max_new_tokens; "
                       "daemon RSS between runs", seed=SEED, settings=settings)
    work = Path(args.work)
    if args.fresh and (work / "cells").is_dir():
        for f in (work / "cells").glob("*.json"):
            f.unlink()
    cells = Cells(work)

    # The order: base first, then each sweep, then base again (noise and drift over the run).
    points: list[tuple[dict, int]] = [(dict(BASE), 0)]
    for factor, values in sweeps_def.items():
        for v in values:
            p = {**BASE, factor: v}
            if p != BASE and (p, 0) not in points:
                points.append((p, 0))
    points.append((dict(BASE), 1))
    rows = []
    for i, (p, rep) in enumerate(points):
        key = {"point": p, "repeat": rep, "seed": SEED, "judge": JUDGE, "proposal": PROPOSAL, "v": 1}
        cached = cells.path(key).is_file()
        log(f"point {i + 1}/{len(points)} {p} repeat {rep}{' (cached)' if cached else ''}")
        row = cells.get_or_run(key, lambda: measure_point(p))
        row["repeat"] = rep
        log(f"  wall {row['wall_s']:.1f} s (sample {row['sample_s']:.1f}, score {row['score_s']:.1f}, "
            f"judge {row['judge_s']:.2f}), tokens {row['tokens']}, peak {row['peak_run_mb']:.0f} MiB, "
            f"before {row['rss_ready_mb']:.0f} MiB, load {row['load_after']}")
        rows.append(row)

    base_rows = [r for r in rows if all(r[k] == v for k, v in BASE.items())]
    base0 = next(r for r in base_rows if r["repeat"] == 0)
    sweeps = {}
    for factor, values in sweeps_def.items():
        sweeps[factor] = [base0 if v == BASE[factor] else
                          next(r for r in rows if r[factor] == v and all(r[k] == BASE[k] for k in BASE if k != factor))
                          for v in values]
    fits = []
    for factor, srows in sweeps.items():
        for y in ("wall_s", "peak_run_mb"):
            fits.append(fit(srows, factor, y))
        if factor == "max_new_tokens":
            fits.append({**fit(srows, "tokens", "wall_s"), "factor": "tokens (generated)"})

    phase_rows = []
    for p in (QUICK_PHASE_POINTS if args.quick else PHASE_POINTS):
        p = {**p, "phases": True}
        key = {"point": p, "seed": SEED, "judge": JUDGE, "proposal": PROPOSAL, "v": 1}
        log(f"phase peaks {p}{' (cached)' if cells.path(key).is_file() else ''}")
        row = cells.get_or_run(key, lambda: measure_point(p))
        log(f"  peak {row['peak_run_mb']:.0f} MiB: sample {row['peak_sample_mb']:.0f}, score {row['peak_score_mb']:.0f}, "
            f"judge {row['peak_judge_mb']:.0f}; ready {row['rss_ready_mb']:.0f} MiB")
        phase_rows.append(row)

    daemon = dsum = None
    if not args.no_daemon:
        key = {"daemon": DAEMON, "runs": daemon_runs, "seed": SEED, "judge": JUDGE, "proposal": PROPOSAL, "v": 1}
        log(f"daemon: {daemon_runs} runs every {DAEMON['every']}"
            f"{' (cached)' if cells.path(key).is_file() else ''}")
        daemon = cells.get_or_run(key, lambda: measure_daemon(daemon_runs, log))
        dsum = summarise_daemon(daemon)
        log(f"daemon: loaded {dsum['rss_loaded_mb']} MiB, after run 1 {dsum.get('rss_after_first_run_mb')} MiB, "
            f"growth {dsum.get('growth_mb_per_run_after_first')} MiB/run, exit {daemon['exit_code']}")

    columns = ["varied", "prompts", "samples", "max_new_tokens", "tokens", "wall_s", "sample_s", "score_s",
               "judge_s", "ms_per_token", "rss_model_mb", "rss_ready_mb", "peak_run_mb", "rss_end_mb", "maxrss_before_run_mb"]
    summary = []
    for factor, srows in sweeps.items():
        for r in srows:
            summary.append({"varied": factor, **{c: r[c] for c in columns[1:]}})
    for r in base_rows:
        if r["repeat"] == 1:
            summary.append({"varied": "base (repeat)", **{c: r[c] for c in columns[1:]}})

    notes = (
        "One estimation run per point, each in a fresh process with one torch thread; wall_s is "
        "run_estimation alone (model load and warm-up excluded), split into engine.sample, engine.score "
        "and judge.score; tokens = generated tokens (responses stop at end-of-turn). rss_model_mb = VmRSS "
        "after TransformersEngine.load() (weights mmapped, mostly not yet paged in), rss_judge_mb after the "
        "judge's warm-up, rss_ready_mb after a 1-sample warm-up draw (weights paged in): the baseline "
        "before the run; peak_run_mb = VmHWM during run_estimation "
        "(reset just before it), maxrss_before_run_mb = ru_maxrss before that reset (the peak "
        "of loading and warm-up), maxrss_mb = ru_maxrss at the end (clear_refs resets it with VmHWM). 'phase_peaks' (rows with "
        "phases: true in results) repeats two points in fresh processes with VmHWM reset around every "
        "engine.sample, engine.score and judge.score call: the peak of each phase; those rows (added after "
        "the sweep) also have cpu_s, the process CPU seconds of the run, which the sweep rows lack. 'fits' holds least-squares "
        "lines (slope in seconds or MiB per unit) and the log-log exponent between the extreme points. "
        "'daemon' is a real `tailmon run` watched every second (VmRSS/VmHWM, tailmon_run_in_progress). "
        "The 2 cores are shared with other benchmarks: see each row's load averages; the base point was "
        "run twice (first and last) to show the noise.")
    phase_cols = ["prompts", "samples", "max_new_tokens", "rss_ready_mb", "peak_sample_mb", "peak_score_mb",
                  "peak_judge_mb", "peak_run_mb", "wall_s", "cpu_s"]
    extra = {"fits": fits, "phase_peaks": [{c: r.get(c) for c in phase_cols} for r in phase_rows],
             # the 1-minute load average over the points when they ran (load_average is this invocation's)
             "load_average_points": {"min": min(x for r in rows + phase_rows for x in (r["load_before"][0], r["load_after"][0])),
                                     "max": max(x for r in rows + phase_rows for x in (r["load_before"][0], r["load_after"][0]))},
             # what the measurements cost when they ran (wall_seconds is this invocation's, cells reused)
             "measured_seconds": round(sum(r.get("subprocess_s", 0) for r in rows + phase_rows)
                                       + (daemon["trace"][-1]["t"] + daemon["stop_s"] if daemon else 0), 1)}
    if daemon:
        extra["daemon"] = {"summary": dsum, "runs_table": daemon["runs"], "exit_code": daemon["exit_code"],
                           "stop_s": daemon["stop_s"], "config": daemon["config"], "trace": daemon["trace"],
                           "log_tail": daemon["log_tail"]}
    out = run.write(summary=summary, results=rows + phase_rows, notes=notes, out=Path(args.out) if args.out else None, **extra)
    log(f"wrote {out}")
    for p in plots(sweeps, daemon, dsum, out.parent):
        log(f"wrote {p}")
    readme = readme_section(json.loads(out.read_text()), sweeps, fits, dsum)
    readme_path = Path(args.readme) if args.readme else work / "readme-tables.md"
    readme_path.write_text(readme, encoding="utf-8")
    log(f"wrote {readme_path}")
    return 0


def readme_section(payload: dict, sweeps: dict, fits: list[dict], dsum: dict | None) -> str:
    """The tables of the README section (observations are written by hand around them)."""
    fmt = {"wall_s": ".1f", "sample_s": ".1f", "score_s": ".1f", "judge_s": ".2f", "ms_per_token": ".1f",
           "rss_model_mb": ".0f", "rss_ready_mb": ".0f", "peak_run_mb": ".0f", "rss_end_mb": ".0f", "maxrss_before_run_mb": ".0f"}
    cols = ["varied", "prompts", "samples", "max_new_tokens", "tokens", "wall_s", "sample_s", "score_s",
            "judge_s", "ms_per_token", "rss_ready_mb", "peak_run_mb", "rss_end_mb"]
    parts = [markdown_table(payload["summary"], cols, fmt)]
    parts.append(markdown_table(fits, ["factor", "y", "slope", "intercept", "r2", "loglog_exponent"]))
    if payload.get("phase_peaks"):
        parts.append(markdown_table(payload["phase_peaks"], list(payload["phase_peaks"][0]),
                                    {"rss_ready_mb": ".0f", "peak_sample_mb": ".0f", "peak_score_mb": ".0f",
                                     "peak_judge_mb": ".0f", "peak_run_mb": ".0f", "wall_s": ".1f", "cpu_s": ".1f"}))
    if dsum:
        parts.append(markdown_table(dsum["runs"], ["run", "rss_before_mb", "rss_peak_during_mb", "rss_after_mb",
                                                   "hwm_after_mb", "duration_s"]))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
