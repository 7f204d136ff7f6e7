"""A LoRA fitted on the target's own hits against brute force on a whole-response judge (issue 17):
the toxicity judge on 16-token replies of P2, the reference and events of benchmarks/tilt.py.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_hits.py   # writes results/lora_hits.json

**Proposal**: `lora-ideal`, a LoRA adapter fitted by cross-entropy (the product's trainer,
`tailmon.proposals.lora._Trainer`, with its KL(p || q) penalty) on every hit at T = 0.5 of the
reference's first half, trained on the sampled token ids themselves (the stop token included
where the reply ended): those replies are exact draws of q* ~ p h, the zero-variance proposal at
T = 0.5, so this is what a LoRA fitted by CE can reach when its training data is perfect (CEM's
last round with infinitely many samples). Texts are not re-tokenised: 18 of the 143 hits do not
round-trip through decode and encode, and the adapter should learn the replies the target drew.
`lora-ideal-return-K`: the same adapter drawing the first K tokens, the target the rest
(`return:K:lora:PATH`); its weights involve only the first K tokens.

**Pools**: per proposal, --repeats independent pools of --n samples (the target at the pipeline's
defensive share 0.1, the production `draw`, graded toxicity kept). Every pool is read at every
threshold as tilt.py reads its pools (`tilt.event_row`: hits, p_hat and interval, reliable, z
against p_ref with both errors, n_IS from the pool's stratified per-sample variance of w h, n_MC,
their ratio); `all` rows read the repeats concatenated (one estimate from repeats x n samples, the
same mixture), next to the per-pool ratios. A pool's n_IS is itself noisy: a pool that missed
the heavy hits sees a small variance. So each proposal is also read on the reference's second
half (`n_MC/n_IS (ref)`): the stratified variance computed from q/p of the target's own draws
(bounded terms, see `reference_reading`), the figure every pool estimates.

**Second judge**: `keywords:FILE` with a small profanity list (benchmarks/data/profanity-words.txt),
applied to the decoded replies of the reference's second half (its p_ref) and of every pool. The
adapter was not fitted for it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bruteforce import PROMPTS  # noqa: E402
from common import Cells, Run, markdown_table  # noqa: E402
from reference import mixture_reading  # noqa: E402
from tilt import DEFENSIVE, FIT_THRESHOLD, REL, THRESHOLDS, event_row, open_reference, reference_arguments  # noqa: E402

WORDS = HERE / "data" / "profanity-words.txt"
VERSION = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    reference_arguments(parser, "/tmp/tailmon-bench-lorahits", "lora_hits.json")
    parser.add_argument("--n", type=int, default=400, help="samples per pool")
    parser.add_argument("--repeats", type=int, default=3, help="independent pools per proposal")
    parser.add_argument("--returns", default="4,8", help="K of the return-to-target pools ('' for none)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="optimiser steps (LoraSettings' default)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl", type=float, default=0.25)
    parser.add_argument("--words", type=Path, default=WORDS)
    parser.add_argument("--only-fit", action="store_true", help="fit the adapter (timed) and stop")
    args = parser.parse_args(argv)
    ref, half = open_reference(args)
    tox_fit, tox_ref = ref["toxicity"][:half], ref["toxicity"][half:]
    returns = [int(k) for k in args.returns.split(",") if k.strip()]

    from tailmon.engines.base import Decoding, Variant
    from tailmon.engines.transformers_engine import TransformersEngine
    from tailmon.estimators import balance_log_weights
    from tailmon.judges import parse_judge
    from tailmon.proposals import parse_proposal
    from tailmon.proposals.lora import LoraSettings, _Example, _Trainer
    from tailmon.proposals.sampling import derive_seed, draw

    prompt = PROMPTS[args.prompt]
    settings = {"model": "smollm2-135m-instruct (embedded, float32, CPU)", "prompt": prompt, "temperature": 1.0,
                "max_new_tokens": args.max_new_tokens, "thresholds": list(THRESHOLDS), "defensive": DEFENSIVE,
                "n": args.n, "repeats": args.repeats, "returns": returns, "reference": args.reference,
                "reference_split": "cells 0..14 fit the adapter, p_ref from cells 15..29",
                "fit_threshold": FIT_THRESHOLD, "relative_error": REL,
                "lora": {"rank": args.rank, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                         "kl": args.kl}, "keywords": str(args.words.relative_to(HERE.parent))
                if args.words.is_relative_to(HERE.parent) else str(args.words)}
    run = Run("lora_hits", "lora_hits: a LoRA fitted on the target's own hits vs brute force, toxicity judge, "
              "16-token replies", seed=args.seed, settings=settings)
    args.work.mkdir(parents=True, exist_ok=True)
    cells = Cells(args.work)
    engine = TransformersEngine.load(None, batch_size=128)
    graded = parse_judge("toxicity")
    keywords = parse_judge(f"keywords:{args.words}")
    target = Variant("target", Decoding(temperature=1.0, max_new_tokens=args.max_new_tokens))

    # -- the adapter, fitted on the target's own hits (exact draws of q*)
    hit_idx = np.flatnonzero(tox_fit >= FIT_THRESHOLD)
    responses = [list(map(int, ref["ids"][i][: ref["lengths"][i]])) for i in hit_idx]
    lora_settings = LoraSettings(rank=args.rank, steps=args.steps, batch_size=args.batch_size, lr=args.lr, kl=args.kl)
    fit_key = ["fit", VERSION, prompt, responses, settings["lora"], args.seed]
    # one folder per fit: the cells of other settings keep pointing at their own adapter
    adapter = args.work / f"lora-ideal-{cells.path(fit_key).stem}"

    def fit_job():
        start = time.perf_counter()
        trainer = _Trainer(engine, target.decoding.temperature, lora_settings, args.seed, resume_from=None)
        prompt_ids = engine.prompt_ids(prompt, target.system_prompt)
        examples = [_Example(prompt_ids, r, 1.0) for r in responses]
        before, after = trainer.fit(examples, derive_seed(args.seed, "lora-hits", "fit"), False, "fit")
        trainer.save(adapter)
        del trainer
        return {"path": str(adapter), "hits": len(responses), "loss_before": before, "loss_after": after,
                "seconds": round(time.perf_counter() - start, 1)}

    fit = cells.get_or_run(fit_key, fit_job)
    lora_spec = f"lora:{fit['path']}"
    # How close the adapter came to q* on its own training hits: log q/p per hit (log(1/P) = 4.7
    # at T = 0.5 for q* itself, the same for every hit).
    # The same on the second half's hits, never fitted (a diagnostic read after the fit, used to
    # choose nothing): an adapter near q* gives about log(1/P) there too, one that memorised its
    # training replies gives them far more and unseen hits far less.
    lora_variant = parse_proposal(lora_spec).variant(target)
    held_idx = half + np.flatnonzero(tox_ref >= FIT_THRESHOLD)
    held = [list(map(int, ref["ids"][i][: ref["lengths"][i]])) for i in held_idx]

    def log_ratio(rs):
        d = engine.score(prompt, lora_variant, rs) - engine.score(prompt, target, rs)
        return {"mean": float(np.mean(d)), "sd": float(np.std(d)), "min": float(np.min(d)),
                "median": float(np.median(d)), "max": float(np.max(d))}

    fit["log_1_over_P"] = float(-math.log(np.mean(tox_fit >= FIT_THRESHOLD)))
    fit["train_log_q_over_p"] = log_ratio(responses)
    fit["heldout_log_q_over_p"] = log_ratio(held)
    print(f"[fit] lora-ideal: {fit['hits']} hits, loss {fit['loss_before']:.3g} -> {fit['loss_after']:.3g} "
          f"({fit['seconds']} s); log(1/P) {fit['log_1_over_P']:.2f}; log q/p on its training hits "
          f"{fit['train_log_q_over_p']}, on {len(held)} unseen hits {fit['heldout_log_q_over_p']}", flush=True)
    if args.only_fit:
        return 0

    def pool(label: str, spec: str, r: int) -> dict:
        key = ["pool", VERSION, prompt, spec, fit_key, args.n, args.seed, r, args.max_new_tokens]

        def job():
            start = time.perf_counter()
            variants = [target, parse_proposal(spec).variant(target)]
            d = draw(engine, prompt, variants, [DEFENSIVE, 1 - DEFENSIVE], args.n,
                     seed=lambda j: derive_seed(args.seed, "lora-hits-bench", label, r, j), judge=graded)
            # named by the fit too: pools of another fit never overwrite these
            path = args.work / f"{label}-{cells.path(fit_key).stem}-{r}.npz"
            np.savez_compressed(path, logq=d.logq, drawn=d.drawn, scores=d.scores, shares=d.shares,
                                keywords=keywords.score([prompt] * len(d.texts), d.texts),
                                texts=np.array(d.texts, dtype=str))
            return {"npz": str(path), "seconds": round(time.perf_counter() - start, 1), "horizon": d.horizon}

        cell = cells.get_or_run(key, job)
        z = np.load(cell["npz"])
        lw = balance_log_weights(z["logq"][:, 0], z["logq"], z["shares"])
        print(f"[pool] {label} #{r}: {args.n} samples ({cell['seconds']} s), toxicity>=0.5 hits "
              f"{int(np.sum(z['scores'] >= 0.5))}, keyword hits {int(np.sum(z['keywords'] > 0))}", flush=True)
        return {"label": label, "repeat": r, "spec": spec, "seconds": cell["seconds"], "log_w": lw,
                "drawn": z["drawn"], "scores": z["scores"], "keywords": z["keywords"], "texts": list(z["texts"])}

    t0 = time.perf_counter()
    specs = {"lora-ideal": lora_spec} | {f"lora-ideal-return-{k}": f"return:{k}:{lora_spec}" for k in returns}
    pools = {label: [pool(label, spec, r) for r in range(args.repeats)] for label, spec in specs.items()}
    stage_pools = time.perf_counter() - t0

    # -- the keywords judge's reference: the second half's replies, decoded as the engine decodes
    ref_texts = [engine.decode(list(map(int, ref["ids"][i][: ref["lengths"][i]]))) for i in range(half, len(ref["ids"]))]
    kw_ref = np.asarray(keywords.score([prompt] * len(ref_texts), ref_texts), dtype=float)
    events = [(f"toxicity>={t:g}", "scores", t, tox_ref) for t in THRESHOLDS] + [("keywords", "keywords", 0.5, kw_ref)]

    train_texts = {engine.decode(r) for r in responses}
    # Where the second half's hits at T = 0.5 become hits: the shortest prefix (in tokens) whose
    # decoded text the toxicity judge already scores >= 0.5. A return-K proposal can lift only
    # what the first K tokens decide.
    crossing = []
    for i in half + np.flatnonzero(tox_ref >= FIT_THRESHOLD):
        ids = list(map(int, ref["ids"][i][: ref["lengths"][i]]))
        prefix_scores = np.asarray(graded.score([prompt] * len(ids), [engine.decode(ids[:k]) for k in range(1, len(ids) + 1)]))
        crossing.append(int(np.argmax(prefix_scores >= FIT_THRESHOLD)) + 1 if (prefix_scores >= FIT_THRESHOLD).any() else None)
    hit_onset = {"first_hit_prefix_tokens": crossing,
                 **{f"share_within_{k}": float(np.mean([c is not None and c <= k for c in crossing])) for k in returns}}

    # -- the same proposals read on the reference's second half (its target draws): every hit's
    # r = q/p under each proposal (q of the first K tokens for return-K), so that the stratified
    # per-sample variance sum_j a_j Var_qj(w h) follows from E_qj[f] = E_p[f q_j / p], with
    # w = 1 / (a_0 + a_1 r). Every term is bounded (w <= 1/a_0, w r <= 1/a_1), so this reading
    # does not depend on a pool happening to draw the heavy hits: the figure a pool estimates.
    any_hit = np.flatnonzero((tox_ref >= min(THRESHOLDS)) | (kw_ref > 0))
    ref_hits = [list(map(int, ref["ids"][half + i][: ref["lengths"][half + i]])) for i in any_hit]
    log_p_full = engine.score(prompt, target, ref_hits)
    log_r = {"lora-ideal": engine.score(prompt, lora_variant, ref_hits) - log_p_full}
    for k in returns:
        heads = [r[:k] for r in ref_hits]
        log_r[f"lora-ideal-return-{k}"] = engine.score(prompt, lora_variant, heads) - engine.score(prompt, target, heads)

    def reference_reading(label: str, h_ref: np.ndarray) -> dict:
        lr = np.asarray(log_r[label])[h_ref[any_hit] > 0]
        read = mixture_reading(np.stack([np.zeros_like(lr), lr], axis=1), [DEFENSIVE, 1 - DEFENSIVE], len(h_ref))
        return {"ref_var1": read["var1"], "ref_ratio": read["ratio"],
                "ref_log_q_over_p_hits": {"mean": float(np.mean(lr)), "median": float(np.median(lr)),
                                          "min": float(np.min(lr)), "max": float(np.max(lr))}}
    rows, summary = [], []
    for name, field, thr, graded_ref in events:
        hits_ref = int(np.count_nonzero(graded_ref >= thr))
        p_ref = hits_ref / len(graded_ref)
        base = {"event": f"{args.prompt} {name}", "p_ref": p_ref, "p_ref_hits": hits_ref,
                "p_ref_rel_se": math.sqrt((1 - p_ref) / (len(graded_ref) * p_ref)) if hits_ref else None}
        for label, reps in pools.items():
            ratios = []
            for p in reps:
                h = (p[field] >= thr).astype(float)
                row = {**base, "proposal": label, "repeat": p["repeat"], "n": len(h),
                       **event_row(p["log_w"], h, p["drawn"], p_ref, len(graded_ref)), "pool_seconds": p["seconds"]}
                rows.append(row)
                ratios.append(row["ratio"])  # None: a pool without hits (no variance to read)
            h = np.concatenate([(p[field] >= thr).astype(float) for p in reps])
            lw = np.concatenate([p["log_w"] for p in reps])
            drawn = np.concatenate([p["drawn"] for p in reps])
            row = {**base, "proposal": label, "repeat": "all", "n": len(h),
                   **event_row(lw, h, drawn, p_ref, len(graded_ref)),
                   "ratios": ratios,
                   # a pool without hits is an upper bound (p_hat 0), which the estimator calls
                   # reliable: counted apart
                   "pools_without_hits": sum(r["hits"] == 0 for r in rows[-len(reps):]),
                   "reliable_pools": sum(r["reliable"] and r["hits"] > 0 for r in rows[-len(reps):]),
                   "covered_pools": sum(r["covered"] for r in rows[-len(reps):])}
            # Where the hits' weights sit: the spread of log10(w) over the hits of all repeats.
            lw_hits = lw[h > 0] / math.log(10)
            row["log10_w_hits"] = ({"min": float(lw_hits.min()), "median": float(np.median(lw_hits)),
                                    "max": float(lw_hits.max())} if len(lw_hits) else None)
            row["top_hit_share"] = float(np.max(np.exp(lw[h > 0])) / np.sum(np.exp(lw[h > 0]))) if len(lw_hits) else None
            # Hits that are verbatim copies of a training reply, and their share of sum w h: what
            # the adapter memorised rather than learnt.
            copy = np.array([t in train_texts for p in reps for t in p["texts"]]) & (h > 0)
            row["copied_hits"] = int(copy.sum())
            row["copied_wh_share"] = float(np.exp(lw[copy]).sum() / np.exp(lw[h > 0]).sum()) if len(lw_hits) else None
            row.update(reference_reading(label, graded_ref >= thr))
            rows.append(row)
            summary.append({"event": base["event"], "p_ref": f"{p_ref:.2e}", "proposal": label,
                            "n": f"{args.repeats}x{args.n}", "hits": row["hits"], "p_hat": f"{row['p_hat']:.2e}",
                            "z": None if row["z"] is None else round(row["z"], 2),
                            "reliable (pools with hits)": f"{row['reliable_pools']}/{len(reps) - row['pools_without_hits']}",
                            "reliable (all)": row["reliable"], "covered (pools)": f"{row['covered_pools']}/{len(reps)}",
                            "ess_wh": round(row["ess_wh"], 1),
                            "n_MC/n_IS (all)": None if row["ratio"] is None else round(row["ratio"], 2),
                            "n_MC/n_IS (pools)": " / ".join("-" if x is None else f"{x:.2g}" for x in ratios),
                            "n_MC/n_IS (ref)": None if row["ref_ratio"] is None else round(row["ref_ratio"], 2),
                            "top hit share": None if row["top_hit_share"] is None else round(row["top_hit_share"], 2),
                            "copied hits": row["copied_hits"]})
    examples = {label: [t for p in reps for t, s in zip(p["texts"], p["scores"]) if s >= FIT_THRESHOLD][:8]
                for label, reps in pools.items()}
    run.write(out=args.out, summary=summary, results=rows, notes=__doc__.split("\n\n", 2)[2],
              stage_seconds={"pools": round(stage_pools, 1), "fit": fit["seconds"],
                             "reference": round(ref["seconds"], 1)},
              fit=fit, hit_onset=hit_onset, hit_examples=examples)
    print(markdown_table(summary, list(summary[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
