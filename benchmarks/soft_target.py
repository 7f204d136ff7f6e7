"""A LoRA fitted to a *soft* target on every reference sample, read on the held-out hits (issue 17).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soft_target.py --steps 100 --lr 1e-3
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soft_target.py --steps 200 --lr 5e-3
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soft_target.py --steps 200 --lr 2e-3 --modules lm_head

lora_hits.py fitted an adapter by cross-entropy on the 143 hits (toxicity >= 0.5) of the 16-token
reference's first half, exact draws of q* ~ p h, and found that it learns those replies, not the
event. This asks whether more data helps: the fit's target is the soft q_g ~ p g with
g = min(1, s / T)^gamma (s the classifier's graded toxicity, T = 0.5), fitted on *all* 15,000
first-half samples with CE weights g (the trainer's minibatches drawn in proportion to them): an
exact Monte Carlo of the CE objective towards q_g. Every hit keeps weight 1; near-misses count
less. Read exactly on the reference (no model run), q_g itself would give n_MC/n_IS = 40 / 31 /
30 at toxicity >= 0.5 / 0.9 / 0.99 (gamma 2, target share 0.1: `exact_soft` in the results), and
its CE weights' ESS over the first half is 905 where the hits alone are 143. The fitted adapter is read as designs.py reads a
component (`reference.mixture_reading` on the second half's hits, target share 0.1, every design
shape), with the mean and 10th percentile of log q/p over those unseen hits (log(1 / E_p g) = 3.46
for q_g itself). Writes results/soft_target_<label>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bruteforce import PROMPTS  # noqa: E402
from common import Run, markdown_table  # noqa: E402
from designs import designs, hit_token_logprobs  # noqa: E402
from reference import mixture_reading  # noqa: E402
from tilt import DEFENSIVE, THRESHOLDS, open_reference, reference_arguments  # noqa: E402

SOFT_THRESHOLD = 0.5


def soft_weights(tox: np.ndarray, gamma: float, threshold: float = SOFT_THRESHOLD) -> np.ndarray:
    """g = min(1, s / T)^gamma: 1 on every hit at T, smaller below it."""
    return np.minimum(1.0, np.asarray(tox, dtype=float) / threshold) ** gamma


def exact_soft_reading(tox_fit: np.ndarray, tox_ref: np.ndarray, gamma: float) -> dict:
    """n_MC/n_IS of q_g ~ p g itself (the target at share DEFENSIVE), read on the second half:
    q_g / p = g / E_p[g], E_p[g] from the first half."""
    mean_g = float(soft_weights(tox_fit, gamma).mean())
    out = {"log_1_over_E_g": float(-np.log(mean_g))}
    for t in THRESHOLDS:
        h = tox_ref >= t
        log_f = np.log(soft_weights(tox_ref[h], gamma) / mean_g)
        out[f"toxicity>={t}"] = mixture_reading(np.stack([np.zeros(h.sum()), log_f], 1), [DEFENSIVE, 1 - DEFENSIVE],
                                                len(tox_ref))["ratio"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    reference_arguments(parser, "/tmp/tailmon-bench-soft", "soft_target.json")
    parser.add_argument("--gamma", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl", type=float, default=0.25, help="the trainer's KL(p || q) penalty (its default)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modules", default=None, help="LoRA target modules, comma-separated (default: q_proj,v_proj)")
    args = parser.parse_args(argv)
    ref, half = open_reference(args)
    from tailmon.engines.base import Decoding, Variant
    from tailmon.engines.transformers_engine import TransformersEngine
    from tailmon.proposals.lora import LoraSettings, _Example, _Trainer

    tox = ref["toxicity"]
    tox_fit, tox_ref = tox[:half], tox[half:]
    width = args.max_new_tokens
    prompt = PROMPTS[args.prompt]
    engine = TransformersEngine.load(None, batch_size=128)
    dec = Decoding(temperature=1.0, max_new_tokens=width)
    target = Variant("target", dec)
    g = soft_weights(tox_fit, args.gamma)
    prompt_ids = engine.prompt_ids(prompt, None)
    examples = [_Example(prompt_ids, list(map(int, ref["ids"][i][: ref["lengths"][i]])), float(g[i]))
                for i in range(half) if ref["lengths"][i] > 0]
    modules = tuple(args.modules.split(",")) if args.modules else None
    settings = LoraSettings(rank=args.rank, steps=args.steps, batch_size=args.batch_size, lr=args.lr, kl=args.kl,
                            target_modules=modules)
    label = f"g{args.gamma:g}-s{args.steps}-lr{args.lr:g}" + (f"-{args.modules.replace(',', '+')}" if modules else "")
    folder = args.work / f"lora-{label}"
    # created before the fit, so that its load average "before" is the machine's before the work
    run = Run("soft_target", "soft_target: a LoRA fitted to q ~ p min(1, s/T)^gamma on every reference sample, "
              "read on the held-out hits", seed=args.seed,
              settings={"prompt": prompt, "max_new_tokens": width, "defensive": DEFENSIVE, "reference": args.reference,
                        "gamma": args.gamma, "soft_threshold": SOFT_THRESHOLD, "lora": vars(settings) | {
                            "target_modules": list(modules) if modules else None},
                        "examples": len(examples), "weights_ess": float(g.sum() ** 2 / (g ** 2).sum())})
    start = time.perf_counter()
    trainer = _Trainer(engine, 1.0, settings, args.seed, resume_from=None)
    before, after = trainer.fit(examples, args.seed + 12345, True, "fit")
    trainer.save(folder)
    del trainer
    fit_seconds = round(time.perf_counter() - start, 1)
    print(f"[fit] {label}: {fit_seconds} s, loss {before:.4g} -> {after:.4g}", flush=True)

    hit_idx = np.flatnonzero(tox_ref >= min(THRESHOLDS))
    hits = [list(map(int, ref["ids"][half + i][: ref["lengths"][half + i]])) for i in hit_idx]

    lt = (hit_token_logprobs(engine, prompt, Variant("lora", dec, adapter=str(folder)), hits, width)
          - hit_token_logprobs(engine, prompt, target, hits, width))
    results = []
    for design, log_f in designs(lt).items():
        row = {"design": design}
        for t in THRESHOLDS:
            h = tox_ref[hit_idx] >= t
            read = mixture_reading(np.stack([np.zeros(h.sum()), log_f[h]], 1), [DEFENSIVE, 1 - DEFENSIVE], len(tox_ref))
            row[f"toxicity>={t}"] = read["ratio"]
            row[f"mean log q/p, >={t}"] = float(np.mean(log_f[h]))
            row[f"p10 log q/p, >={t}"] = float(np.percentile(log_f[h], 10))
        results.append(row)
    exact = exact_soft_reading(tox_fit, tox_ref, args.gamma)
    cols = ["design", *[f"toxicity>={t}" for t in THRESHOLDS], f"mean log q/p, >={SOFT_THRESHOLD}",
            f"p10 log q/p, >={SOFT_THRESHOLD}"]
    print(markdown_table(results, cols, {c: ".2f" for c in cols[1:]}))
    print("q_g itself:", exact)
    notes = ("n_MC/n_IS of each design of the fitted adapter (target share 0.1) read on the reference's held-out "
             "hits (reference.mixture_reading), and log q/p over those hits; 'exact_soft' reads q_g itself.")
    out = args.out.with_name(f"soft_target_{label}.json") if args.out.name == "soft_target.json" else args.out
    print(f"wrote {run.write(summary=results, results=results, notes=notes, out=out, exact_soft=exact, fit={'seconds': fit_seconds, 'loss_before': before, 'loss_after': after, 'path': str(folder)})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
