"""Brute-force references for whole-response judges: plain samples of the target, every response's
token ids and graded toxicity kept, so that any judge (a toxicity threshold, a regex) reads the
same samples later without drawing them again.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reference.py --prompt P2 --max-new-tokens 16 --n 30000

Cells of --chunk samples with seeds derive_seed(seed, "reference", prompt id, max_new_tokens, i),
each written when it finishes (resumable; a smaller --n reuses the first cells) under --work as
`ref-<prompt>-<max_new>-<seed>-<i>.npz` holding `ids` (int32, n x max_new, -1 after the end),
`lengths`, `finished` and `toxicity` (float64). `load_reference` reads them back in order.
The P2 reference at 16 tokens (30,000 samples, seed 0) is kept compactly in
benchmarks/data/reference-P2-16tok-seed0.npz (870 KB), which `load_reference` reads when the cells
are absent; so is the P2 reference at 32 tokens (20,000 samples, `--archive` writes such a file from
finished cells). Costs on one core (embedded model, float32, batch 256): about 90 sampled tokens per second, so
30,000 samples take about 46 minutes at 8 tokens and 90 at 16.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import one_torch_thread  # noqa: E402

WORK = Path("/tmp/tailmon-bench-reference")
TEMPERATURE = 1.0


def cell_path(work: Path, pid: str, max_new: int, seed: int, i: int) -> Path:
    return work / f"ref-{pid}-{max_new}-{seed}-{i:04d}.npz"


def draw_cell(engine, judge, prompt: str, target, n: int, seed: int, path: Path) -> float:
    start = time.perf_counter()
    s = engine.sample(prompt, target, n, seed)
    width = target.decoding.max_new_tokens
    ids = np.full((n, width), -1, dtype=np.int32)
    for r, toks in enumerate(s.token_ids):
        ids[r, : len(toks)] = toks
    texts = [engine.decode(t) for t in s.token_ids]
    tox = np.asarray(judge.score([prompt] * n, texts), dtype=np.float64)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, ids=ids, lengths=np.array([len(t) for t in s.token_ids], dtype=np.int16),
                        finished=np.asarray(s.finished), toxicity=tox, seconds=time.perf_counter() - start)
    tmp.replace(path)  # a cell exists only once it is whole
    return time.perf_counter() - start


def archive_path(pid: str, max_new: int, seed: int) -> Path:
    """A finished reference kept with the benchmarks (`--archive`): ids as uint16 (65535 after the
    end), lengths, finished and toxicity (float64), in sample order."""
    return HERE / "data" / f"reference-{pid}-{max_new}tok-seed{seed}.npz"


def load_reference(work: Path, pid: str, max_new: int, seed: int, n: int, chunk: int) -> dict:
    """The first n samples: from the cells under `work` (n / chunk of them, all of which must
    exist), else from the archive kept in benchmarks/data: ids (-1 after the end), lengths,
    finished, toxicity."""
    archive = archive_path(pid, max_new, seed)
    if not all(cell_path(work, pid, max_new, seed, i).exists() for i in range(n // chunk)) and archive.exists():
        z = np.load(archive)
        if len(z["toxicity"]) >= n:
            ids = z["ids"][:n].astype(np.int32)
            ids[ids == 65535] = -1
            return {"ids": ids, "lengths": z["lengths"][:n], "finished": z["finished"][:n],
                    "toxicity": z["toxicity"][:n], "seconds": float(z["seconds"]) * n / len(z["toxicity"])}
    parts = [np.load(cell_path(work, pid, max_new, seed, i)) for i in range(n // chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("ids", "lengths", "finished", "toxicity")} | {
        "seconds": float(sum(float(p["seconds"]) for p in parts))}


def mixture_reading(log_f: np.ndarray, shares, n_ref: int) -> dict:
    """A mixture's efficiency read on a reference: n_MC/n_IS from the target's own draws.

    `log_f` (hits, J): log q_j/p of every hit of the reference under each component j (the
    target's column 0), `shares` the components' shares a_j, `n_ref` the reference's size. The
    per-sample variance of the stratified estimate is sum_j a_j Var_qj(w h) with w = 1 / sum_j a_j
    q_j/p, and E_qj[g] = E_p[g q_j/p]: an average over the target's draws, of which only the hits
    count. Every term is bounded (w q_j/p <= 1/a_j), so the reading does not depend on a pool
    catching the heavy hits, as a pool's own variance does.
    """
    f = np.exp(np.asarray(log_f, dtype=float).reshape(-1, len(shares)))
    a = np.asarray(shares, dtype=float)
    w = 1.0 / (f @ a)
    first = (w[:, None] * f).sum(axis=0) / n_ref
    second = (w[:, None] ** 2 * f).sum(axis=0) / n_ref
    var1 = float(a @ (second - first ** 2))
    p = len(w) / n_ref
    return {"p": p, "hits": len(w), "var1": var1, "ratio": p * (1 - p) / var1 if var1 > 0 else None,
            "median_log10_w": float(np.median(np.log10(w))) if len(w) else None}


def main(argv: list[str] | None = None) -> int:
    from bruteforce import PROMPTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", required=True, choices=sorted(PROMPTS))
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--n", type=int, default=30000)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--archive", action="store_true",
                        help="after the cells, write them to benchmarks/data (archive_path) for load_reference")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if one_torch_thread() != 1:
        raise SystemExit("torch must run on one thread here")
    if args.n % args.chunk:
        raise SystemExit("--n must be a multiple of --chunk")
    args.work.mkdir(parents=True, exist_ok=True)

    from tailmon.engines.base import Decoding, Variant
    from tailmon.engines.transformers_engine import TransformersEngine
    from tailmon.judges import parse_judge
    from tailmon.proposals.sampling import derive_seed

    engine = TransformersEngine.load(None, batch_size=args.batch_size)
    judge = parse_judge("toxicity")
    target = Variant("target", Decoding(temperature=TEMPERATURE, max_new_tokens=args.max_new_tokens))
    prompt = PROMPTS[args.prompt]
    hits = np.zeros(3, dtype=int)
    for i in range(args.n // args.chunk):
        path = cell_path(args.work, args.prompt, args.max_new_tokens, args.seed, i)
        if path.exists():
            tox = np.load(path)["toxicity"]
            took = "kept"
        else:
            took = f"{draw_cell(engine, judge, prompt, target, args.chunk, derive_seed(args.seed, 'reference', args.prompt, args.max_new_tokens, i), path):.0f} s"
            tox = np.load(path)["toxicity"]
        hits += [(tox >= t).sum() for t in (0.5, 0.9, 0.99)]
        print(f"[reference] {args.prompt} {args.max_new_tokens} tokens: {(i + 1) * args.chunk} samples, "
              f"hits >=0.5/0.9/0.99 {hits.tolist()} ({took})", flush=True)
    if args.archive:
        write_archive(load_reference(args.work, args.prompt, args.max_new_tokens, args.seed, args.n, args.chunk),
                      archive_path(args.prompt, args.max_new_tokens, args.seed))
    return 0


def write_archive(ref: dict, path: Path) -> None:
    """The format `load_reference` reads: ids as uint16 (65535 after the end; the vocabulary has
    49,152 entries), lengths, finished, toxicity (float64) and the drawing's total seconds."""
    ids = np.asarray(ref["ids"])
    if ids.max() >= 65535:
        raise SystemExit("token ids do not fit uint16")
    packed = np.where(ids < 0, 65535, ids).astype(np.uint16)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, ids=packed, lengths=np.asarray(ref["lengths"], dtype=np.int16),
                        finished=np.asarray(ref["finished"]), toxicity=np.asarray(ref["toxicity"], dtype=np.float64),
                        seconds=float(ref["seconds"]))
    tmp.replace(path)
    print(f"[reference] wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
