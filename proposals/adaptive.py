"""Adaptive proposals: a monitor whose mixture learns from its own runs (issue 17, item 2).

A run of an adaptive monitor draws from a mixture that is **fixed before its draws**: the target
with the defensive share, the starting components (the monitor's own proposals, or the shipped
library's system prompts for the run's categories and the target at a hotter temperature) and,
once learnt, a LoRA adapter and a token tilt (`tilt:`, a bias over the vocabulary), with the
relative weights learnt so far. Whatever
earlier runs taught it, the run's estimate is an importance-sampling estimate under a mixture
chosen independently of the run's own draws, so it is unbiased.

After the run, `AdaptiveLearner.update` learns from the run's weighted samples:

1. **Split.** Within every prompt and mixture component, a random `holdout` share of the samples
   is held out; the rest is the fit half. Both halves are stratified draws from the run's mixture.
2. **Cross-entropy steps.** The adapter (the current one, or a fresh one in the first update)
   takes at most `steps` optimiser steps on the fit half's samples weighted by v = w h (the
   balance-heuristic weight times the judge's score), normalised within each prompt: the fit of
   q to q* ~ p h, the target's own harmful responses, that `tailmon proposals train-lora` runs in
   its CEM rounds (same trainer, same KL(p || q) penalty that keeps q covering the target). The
   steps stop early when they have used `time_share` of the run's estimation time.
   A token tilt is fitted to the same weighted hits (`tailmon.proposals.tilt_fit.fit_tilt`, on
   the judge's words when it names some, else on the tokens the hits share), from scratch: the
   cross-entropy fit depends on the earlier proposals only through the weights. While the
   mixture has no tilt yet the weights are tempered (u ~ (w h)^0.5): hits drawn from the
   starting components carry very unequal weights, and an exact fit would copy the few heavy
   ones; once a tilt draws, the weights are even enough to use as they are.
3. **Weights.** Every sample of the run is scored under the new adapter and the new tilt; the relative mixture
   weights and the target's own share (from the monitor's `defensive` share, its floor, up to
   0.9: `TARGET_SHARES`) are tuned by coordinate descent over grids on the fit half, minimising the estimated
   variance of the estimate (the formulas of `tailmon.proposals.tuning`: any candidate mixture's
   variance is estimated from the run's samples by reweighting, since every sample has its
   log-prob under every component), for each candidate: the run's own components (new weights
   only); with the new adapter in place of the current one; with the new tilt in place of the
   current one; with both. A learnt component's grid has 0, so a candidate may also drop one.
   The last run is the next run's pilot.
4. **Adoption.** Of the candidates, the one with the lower estimated variance on the
   held-out samples (which neither fitted the adapter nor chose the weights) replaces the
   current mixture only if that variance is lower than the current mixture's on the same
   samples. Otherwise nothing changes (the candidate adapter and tilt are deleted).

**State** lives in a folder per monitor: `state.json` (format tailmon-adaptive/1: generation, the
current adapter's folder and tilt file, the weights by component, the target's share, the
checkpoints the adapter was trained and the tilt fitted on, the history of updates and of checkpoint changes),
`adapters/gen-NNNN/` (peft adapters with their `tailmon_lora.json` provenance) and
`tilts/gen-NNNN.json` (tilt files, their provenance inside). It is written atomically after each update, so a restarted
daemon carries on where the last one stopped. A **checkpoint change** keeps the state: the
weights stay exact, since p is always scored under the current target and q under the current
target plus the adapter (or tilt); the change is recorded (in `state.json` and in the runs' records) and
the engine adds its warning about an adapter trained on another checkpoint to every estimate.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from tailmon import __version__
from tailmon.engines.adapters import ADAPTER_FORMAT, ADAPTER_METADATA
from tailmon.engines.base import Variant
from tailmon.engines.steering import model_sha256
from tailmon.engines.tilt import save_tilt
from tailmon.errors import InputError
from tailmon.judges import Judge, parse_judge
from tailmon.paths import write_atomically
from tailmon.redact import mask_secrets

from .lora import LoraSettings, _Example, _Trainer
from .sampling import derive_seed, score_unique
from .tilt_fit import HitSet, fit_tilt, word_tokens
from .tuning import candidate_moments, stratified_variance
from .variants import LoraProposal, TiltProposal

STATE_FORMAT = "tailmon-adaptive/1"
STATE_FILE = "state.json"
ADAPTERS_DIR = "adapters"
TILTS_DIR = "tilts"
ADAPTER_KEY = "adapter"
"""The key of the learnt adapter's weight in the state (the others are proposal specs)."""
TILT_KEY = "tilt"
"""The key of the learnt tilt's weight in the state."""
LEARNT = (ADAPTER_KEY, TILT_KEY)
"""The learnt components: the state names each one's file under its key, and its weight too."""
# The tilt's CE weights u ~ (w h)^temper: tempered while the mixture has no tilt (module doc).
TEMPER_FIRST, TEMPER_LATER = 0.5, 1.0
HISTORY_KEPT = 100

# Relative weights the coordinate descent may give a component. Starting components never drop
# to 0: a component that leaves the mixture is no longer scored, so no later run could bring it
# back; an adapter or a tilt may (the new one is then not adopted, or the old one retires).
BASE_GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
ADAPTER_GRID = (0.0,) + BASE_GRID
# Shares the target itself may take above the monitor's `defensive` share (its floor). On an event
# no component finds, the proposals only dilute the target's own draws (variance near P/a0, 1/a0
# times Monte Carlo's): raising a0 bounds the loss. Never 1: the proposals keep a tenth of the
# draws, so later runs can still find hits, learn and lower it again.
TARGET_SHARES = (0.25, 0.5, 0.75, 0.9)
SWEEPS = 3

_SPLIT, _FIT, _INIT = 21, 22, 23  # seed tags


@dataclass(frozen=True)
class AdaptiveSettings:
    """How an adaptive monitor learns (the monitor config's `adaptive:` block)."""

    steps: int = 20
    """Cross-entropy (optimiser) steps per update, at most."""
    time_share: float = 0.5
    """The steps stop once they have taken this share of the run's estimation time (at least one)."""
    holdout: float = 0.5
    """Share of each run's samples held out to decide whether an update is adopted."""
    rank: int = 4
    alpha: float = 8.0
    lr: float = 1e-3
    batch_size: int = 8
    kl: float = 0.25
    hot_temperature: float | None = None
    """The hotter starting component's temperature; None: 1.5 x the deployed temperature."""

    def __post_init__(self):
        if int(self.steps) != self.steps or self.steps < 1:
            raise InputError(f"adaptive steps must be an integer >= 1, got {self.steps}", setting="steps")
        if not (math.isfinite(self.time_share) and self.time_share > 0):
            raise InputError(f"adaptive time_share must be > 0, got {self.time_share}", setting="time_share")
        if not 0 < self.holdout < 1:
            raise InputError(f"adaptive holdout must be in (0, 1), got {self.holdout}", setting="holdout")
        if self.hot_temperature is not None and not self.hot_temperature > 0:
            raise InputError(f"adaptive hot_temperature must be > 0, got {self.hot_temperature}",
                             setting="hot_temperature")
        self.lora()  # its own checks (rank, lr, ...)

    def lora(self) -> LoraSettings:
        return LoraSettings(rank=self.rank, alpha=self.alpha, lr=self.lr, steps=self.steps,
                            batch_size=self.batch_size, kl=self.kl)


def hot_spec(target: Variant, settings: AdaptiveSettings) -> str:
    """The hotter starting component: the target at `hot_temperature` (default 1.5 x its own)."""
    t = settings.hot_temperature or 1.5 * target.decoding.temperature
    return f"temperature:{t:g}"


@dataclass
class AdaptiveMixture:
    """One run's mixture, fixed before its draws, and what the run's record says about it."""

    specs: list[str]
    weights: list[float]
    """Relative weights of `specs` in what the target's share leaves."""
    defensive: float
    """The target's share: the monitor's `defensive` share, or the higher one learnt."""
    record: dict
    """generation, adapter (folder and sha256), tilt (file and sha256), weights by component, the
    checkpoint the adapter was trained on and whether it changed since: stored with the run
    (`adaptive` in its report)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sha256(path: Path) -> str | None:
    f = path / "adapter_model.safetensors" if path.is_dir() else path
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass
class _Half:
    """One prompt's samples of one half of the split."""

    prompt: str
    ids: list[list[int]]
    logq: np.ndarray
    """(n, K + 2): the run's K components, then the new adapter and the new tilt (-inf until
    scored)."""
    union: np.ndarray
    """Realised shares of the run's components within this half (0 for the new columns)."""
    scores: np.ndarray
    v: np.ndarray
    """w h under the run's mixture (w with the run's realised shares)."""

    @property
    def hits(self) -> int:
        return int(np.count_nonzero(self.scores > 0))


@dataclass
class AdaptiveLearner:
    """The learnt state of one monitor, in `folder` (see the module docstring)."""

    folder: Path
    settings: AdaptiveSettings = field(default_factory=AdaptiveSettings)
    state: dict = field(init=False)

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.state = self._load()

    # -- state ----------------------------------------------------------------------------------

    def _load(self) -> dict:
        path = self.folder / STATE_FILE
        fresh = {"format": STATE_FORMAT, "generation": 0, "adapter": None, "tilt": None, "weights": {},
                 "target_share": None, "model": None, "tilt_model": None, "history": [], "checkpoint_changes": []}
        if not path.is_file():
            return fresh
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"adaptive state {path} is unreadable ({exc}): move it away to start learning afresh")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise InputError(f"{path} is not a tailmon adaptive state ({STATE_FORMAT})")
        if state.get("adapter") and not (self.folder / state["adapter"] / "adapter_config.json").is_file():
            raise InputError(f"adaptive state {path} names adapter {state['adapter']}, which is not there: "
                             "restore it, or move the state away to start learning afresh")
        if state.get("tilt") and not (self.folder / state["tilt"]).is_file():
            raise InputError(f"adaptive state {path} names tilt {state['tilt']}, which is not there: "
                             "restore it, or move the state away to start learning afresh")
        return {**fresh, **state}

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.folder / STATE_FILE, json.dumps(self.state, indent=2, allow_nan=False))

    @property
    def generation(self) -> int:
        return int(self.state["generation"])

    @property
    def adapter_path(self) -> str | None:
        name = self.state.get("adapter")
        return str((self.folder / name).resolve()) if name else None

    @property
    def adapter_spec(self) -> str | None:
        path = self.adapter_path
        return None if path is None else f"lora:{path}"

    @property
    def tilt_path(self) -> str | None:
        name = self.state.get("tilt")
        return str((self.folder / name).resolve()) if name else None

    @property
    def tilt_spec(self) -> str | None:
        path = self.tilt_path
        return None if path is None else f"tilt:{path}"

    def _key(self, spec: str) -> str:
        """A component's key in the state's weights: its spec, or the learnt component it is."""
        return {self.adapter_spec: ADAPTER_KEY, self.tilt_spec: TILT_KEY}.get(spec, spec) if spec else spec

    # -- before a run ---------------------------------------------------------------------------

    def mixture(self, base_specs: Sequence[str], *, defensive: float, model_fingerprint: str | None = None,
                model_version: int | None = None, run_id: int | None = None) -> AdaptiveMixture:
        """The next run's proposal specs, relative weights and target share: the starting
        components with their learnt weights (1 for one not seen yet), the current adapter and
        tilt, if any, and the learnt target share, never below the monitor's `defensive`."""
        base = list(dict.fromkeys(base_specs))
        if not base and self.adapter_spec is None and self.tilt_spec is None:
            raise InputError("an adaptive monitor needs starting proposals until it has learnt an adapter or a tilt")
        learnt = self.state["weights"]
        specs = base + [s for s in (self.adapter_spec, self.tilt_spec) if s]
        weights = [float(learnt.get(self._key(s), 1.0)) for s in specs]
        trained_on = self.state.get("model")
        changed = bool(trained_on and model_fingerprint and trained_on.get("fingerprint") != model_fingerprint)
        if changed:
            seen = self.state["checkpoint_changes"]
            if not seen or seen[-1].get("to") != model_fingerprint:
                # Recorded once per new checkpoint: the adapter is kept (the weights stay exact),
                # and the next adopted update is trained on the new checkpoint.
                seen.append({"at": _now(), "run_id": run_id, "from": trained_on.get("fingerprint"),
                             "from_version": trained_on.get("version"), "to": model_fingerprint,
                             "to_version": model_version, "generation": self.generation})
                self._save()
        share = max(float(defensive), float(self.state.get("target_share") or 0.0))
        record = {
            "generation": self.generation,
            "state_dir": str(self.folder),
            "adapter": self.adapter_path,
            "adapter_sha256": _sha256(Path(self.adapter_path)) if self.adapter_path else None,
            "tilt": self.tilt_path,
            "tilt_sha256": _sha256(Path(self.tilt_path)) if self.tilt_path else None,
            "weights": {self._key(s): w for s, w in zip(specs, weights)},
            "target_share": share,
            "adapter_trained_on": trained_on,
            "tilt_fitted_on": self.state.get("tilt_model"),
            "checkpoint_changed": changed,
        }
        return AdaptiveMixture(specs, weights, share, record)

    # -- after a run ----------------------------------------------------------------------------

    def update(self, engine, target: Variant, components: Sequence, results: Sequence, *, seed: int,
               defensive: float | None = None, time_budget_s: float | None = None, judge: Judge | str | None = None,
               run_id: int | None = None, model_fingerprint: str | None = None,
               model_version: int | None = None) -> dict:
        """Learn from one run's samples (see the module docstring); returns the update's record,
        which is also appended to the state's history.

        `components` are the run's mixture components (label, variant, share; component 0 the
        target), `results` its per-prompt results (prompt.text, token_ids, logq, shares,
        component, scores): what the estimation pipeline returns. `defensive` is the monitor's
        target share, the floor of the learnt one (None: the run's own target share). `judge` is
        the run's judge (its words are the tilt's candidate tokens) or its spec.
        """
        t0 = time.monotonic()
        if isinstance(judge, str):
            judge = parse_judge(judge)
        labels = [c.label for c in components]
        a0 = float(components[0].share)
        floor = a0 if defensive is None else min(float(defensive), a0)
        shares = tuple(sorted({floor, a0, *(s for s in TARGET_SHARES if s > floor)}))
        keys = [self._key(lab) for lab in labels]
        record = {"run_id": run_id, "at": _now(), "generation_before": self.generation, "adopted": False}
        if any(r.logq is None for r in results) or len(labels) < 2:
            return self._finish(record, "the run drew from the target only (Monte Carlo): nothing to learn")
        if any(getattr(r, "horizon", None) is not None for r in results):
            # Its log-probs cover the first tokens only (tailmon.proposals.sampling.weight_horizon),
            # while a new adapter's density covers whole responses: they cannot share one mixture.
            return self._finish(record, "the run's components return to the target, so its log-probs cover only "
                                "the first tokens of each response: nothing to learn an adapter from")
        fit, held = self._split(results, derive_seed(seed, _SPLIT))
        record.update(fit_samples=sum(len(h.scores) for h in fit), held_out_samples=sum(len(h.scores) for h in held),
                      fit_hits=sum(h.hits for h in fit), held_out_hits=sum(h.hits for h in held))
        if record["fit_hits"] + record["held_out_hits"] == 0:
            return self._finish(record, "no harmful sample in the run: nothing to learn from")

        # 1. cross-entropy steps on the fit half (from the current adapter), and a tilt fitted to it
        cols = len(labels)
        new: dict[str, tuple[int, Path]] = {}  # learnt kind -> (its new column, its new file or folder)
        if record["fit_hits"]:
            new_dir = self.folder / ADAPTERS_DIR / f"gen-{self.generation + 1:04d}"
            deadline = None if time_budget_s is None else t0 + max(0.0, float(time_budget_s))
            steps, before, after = self._fit(engine, target, fit, new_dir, seed, deadline, judge, run_id,
                                             model_fingerprint, model_version)
            record.update(steps=steps, loss_before=before, loss_after=after)
            new[ADAPTER_KEY] = (cols, new_dir)
            tilt_file, record["tilt"] = self._fit_tilt(engine, target, fit, judge, run_id, model_fingerprint,
                                                        model_version)
            if tilt_file is not None:
                new[TILT_KEY] = (cols + 1, tilt_file)
            for kind, (j, path) in new.items():
                proposal = LoraProposal if kind == ADAPTER_KEY else TiltProposal
                variant = proposal(str(path.resolve())).variant(target)
                for half in fit + held:
                    half.logq[:, j] = score_unique(engine, half.prompt, variant, half.ids)
        record["fit_seconds"] = round(time.monotonic() - t0, 3)

        # 2. weights: coordinate descent on the fit half's estimated variance, for each candidate:
        # the run's components, then each new learnt component (and both) in place of the current one.
        learnt = {j: float(self.state["weights"].get(keys[j], 1.0)) for j in range(1, cols)}
        candidates = []
        for swap in itertools.product(*[(False, True) if kind in new else (False,) for kind in LEARNT]):
            start, pinned = dict(learnt), set()
            for kind, use in zip(LEARNT, swap):
                if use:
                    old = [j for j in range(1, cols) if keys[j] == kind]
                    start[new[kind][0]] = start[old[0]] if old else 1.0
                    # The state holds one adapter and one tilt: the old one is out of this candidate.
                    for j in old:
                        start[j] = 0.0
                        pinned.add(j)
            name = " and ".join(f"new {kind}" for kind, use in zip(LEARNT, swap) if use) or "weights only"
            slots = [(j, ADAPTER_GRID if j >= cols or keys[j] in LEARNT else BASE_GRID)
                     for j in start if j not in pinned]
            candidates.append((name, start, a0, slots))
        # The fit half flatters the components fitted to it; the held-out half decides.
        fit_info = [h for h in fit if h.hits]
        if fit_info:
            candidates = [(name, *self._descend(fit_info, slots, start, a0, shares), slots)
                          for name, start, _, slots in candidates]

        # 3. adoption on the held-out half
        held_info = [h for h in held if h.hits]
        run_cols = list(range(1, cols))
        run_alphas = [float(c.share) for c in components[1:]]
        base_var, base_ess = _objective(held_info, [0] + run_cols, [a0] + run_alphas)
        scored = []
        for name, cand, share, _ in candidates:
            on = {j: w for j, w in cand.items() if w > 0}
            scored.append((*_objective(held_info, [0] + list(on), [share] + _alphas(on, share)), on, share, name))
        # NaN (no held-out hits) sorts as it comes: the first candidate, never adopted below
        new_var, new_ess, chosen, share, name = min(scored, key=lambda t: (math.inf if math.isnan(t[0]) else t[0]))
        record["held_out"] = {"prompts_with_hits": len(held_info), "variance_before": _finite(base_var),
                              "variance_after": _finite(new_var), "ess_wh_per_sample_before": _finite(base_ess),
                              "ess_wh_per_sample_after": _finite(new_ess),
                              "candidates": {n: _finite(v) for v, _, _, _, n in scored}}
        column_names = {j: f"new {kind}" for kind, (j, _) in new.items()}
        record["candidate"] = name
        record["candidate_weights"] = {column_names[j] if j in column_names else keys[j]: w
                                      for j, w in chosen.items()}
        record["target_share_before"], record["candidate_target_share"] = a0, share
        if not held_info:
            reason = "no harmful sample among the held-out samples: the update cannot be judged, not adopted"
        elif not new_var < base_var:
            reason = "the update does not lower the variance estimated on the held-out samples: not adopted"
        else:
            record["adopted"] = True
            reason = f"adopted ({name}): lower variance estimated on the held-out samples"
            self._adopt(chosen, share, keys, new, model_fingerprint, model_version)
        self._prune()  # also deletes the candidate adapter and tilt when they were not adopted
        record["seconds"] = round(time.monotonic() - t0, 3)
        return self._finish(record, reason)

    def _finish(self, record: dict, reason: str) -> dict:
        record["reason"] = reason
        record["generation_after"] = self.generation
        self.state["history"] = (self.state["history"] + [record])[-HISTORY_KEPT:]
        self._save()
        return record

    def _split(self, results, seed: int) -> tuple[list[_Half], list[_Half]]:
        rng = np.random.default_rng(seed)
        fit, held = [], []
        for r in results:
            k = r.logq.shape[1]
            logq = np.concatenate([r.logq, np.full((len(r.token_ids), len(LEARNT)), -np.inf)], axis=1)
            comp = np.asarray(r.component)
            shares = np.asarray(r.shares, dtype=float)
            # w under the run's mixture, with the realised shares, as the estimate weighted them
            used = shares > 0
            log_mix = np.logaddexp.reduce(r.logq[:, used] + np.log(shares[used]), axis=1)
            v = np.where(r.scores > 0, np.exp(r.logq[:, 0] - log_mix) * r.scores, 0.0)
            out = np.zeros(len(comp), dtype=bool)
            for j in np.unique(comp):
                rows = np.flatnonzero(comp == j)
                take = int(round(self.settings.holdout * len(rows)))
                out[rng.choice(rows, size=take, replace=False)] = True
            for mask, dest in ((~out, fit), (out, held)):
                rows = np.flatnonzero(mask)
                if not rows.size:
                    continue
                union = np.zeros(k + len(LEARNT))
                union[:k] = np.bincount(comp[rows], minlength=k) / rows.size
                dest.append(_Half(r.prompt.text, [list(r.token_ids[i]) for i in rows], logq[rows].copy(), union,
                                  np.asarray(r.scores, dtype=float)[rows], v[rows]))
        return fit, held

    def _fit(self, engine, target, fit, new_dir, seed, deadline, judge, run_id, fingerprint, version):
        examples = []
        for h in fit:
            total = h.v.sum()
            if total > 0:
                ids = engine.prompt_ids(h.prompt, target.system_prompt)
                # normalised within the prompt: every prompt's q* counts alike (as in train-lora)
                examples += [_Example(ids, r, float(x / total)) for r, x in zip(h.ids, h.v) if x > 0]
        settings = self.settings.lora()
        trainer = _Trainer(engine, target.decoding.temperature, settings, derive_seed(seed, _INIT),
                           resume_from=self.adapter_path)
        before, after = trainer.fit(examples, derive_seed(seed, _FIT), False, "adaptive", deadline=deadline)
        new_dir.parent.mkdir(parents=True, exist_ok=True)
        trainer.save(new_dir)
        facts = engine.base_facts()
        d = target.decoding
        meta = {
            "format": ADAPTER_FORMAT,
            "base_model": {"ref": engine.model_id, "model_sha256": model_sha256(engine.model, engine.tokenizer),
                           **(facts or {})},
            "target": {"system_prompt": target.system_prompt, "temperature": d.temperature, "top_p": d.top_p,
                       "top_k": d.top_k, "max_new_tokens": d.max_new_tokens},
            "judge": _judge_spec(judge),
            "data": None,
            "cem": None,
            "adaptive": {"state_dir": str(self.folder), "generation": self.generation + 1, "run_id": run_id,
                         "resumed_from": self.state.get("adapter"), "examples": len(examples),
                         "steps": trainer.steps_done, "model_fingerprint": fingerprint, "model_version": version},
            "lora": asdict(settings),
            "seed": int(seed),
            "stages": [],
            "created": _now(),
            "tailmon_version": __version__,
        }
        write_atomically(new_dir / ADAPTER_METADATA, json.dumps(meta, indent=2, allow_nan=False))
        return trainer.steps_done, before, after

    def _fit_tilt(self, engine, target, fit, judge, run_id, fingerprint, version) -> tuple[Path | None, dict]:
        """A token tilt fitted to the fit half's hits, saved as the candidate `tilts/gen-NNNN.json`;
        (None, why) when there is none to try."""
        temper = TEMPER_LATER if self.state.get("tilt") else TEMPER_FIRST
        hits = []
        for h in fit:
            rows = np.flatnonzero(h.v > 0)
            if rows.size:
                hits.append(HitSet(h.prompt, [h.ids[i] for i in rows], h.v[rows]))
        words = judge.words() if judge is not None else []
        candidates = word_tokens(engine, words) if words else None
        info = {"temper": temper, "hits": sum(len(h.responses) for h in hits),
                "candidates": "judge words" if candidates else "tokens shared by the hits"}
        try:
            fitted = fit_tilt(engine, target, hits, candidates=candidates, temper=temper)
        except InputError as exc:  # nothing to fit (no token shared by two hits): the adapter may still learn
            return None, {**info, "fitted": False, "reason": str(exc)}
        if not fitted.token_ids.size:
            return None, {**info, "fitted": False, "reason": "the fitted bias is 0 on every token"}
        path = self.folder / TILTS_DIR / f"gen-{self.generation + 1:04d}.json"
        order = np.argsort(-np.abs(fitted.bias))
        top = [(engine.decode([int(fitted.token_ids[i])]), round(float(fitted.bias[i]), 3)) for i in order[:5]]
        save_tilt(path, fitted.token_ids, fitted.bias, tokenizer_sha256=(engine.base_facts() or {}).get("tokenizer_sha256"),
                  tokens=[engine.decode([int(t)]) for t in fitted.token_ids],
                  provenance={"fitted_by": "tailmon adaptive", "state_dir": str(self.folder),
                              "generation": self.generation + 1, "run_id": run_id, "judge": _judge_spec(judge),
                              "hits": fitted.hits, "prompts": fitted.prompts, "temper": temper,
                              "candidates": info["candidates"], "objective": fitted.objective,
                              "model": {"ref": engine.model_id, "fingerprint": fingerprint, "version": version},
                              "target": {"system_prompt": target.system_prompt,
                                         **{k: getattr(target.decoding, k) for k in
                                            ("temperature", "top_p", "top_k", "max_new_tokens")}},
                              "created": _now(), "tailmon_version": __version__})
        return path, {**info, "fitted": True, "file": str(path), "tokens": int(fitted.token_ids.size),
                      "top": [[t, b] for t, b in top]}

    def _descend(self, halves, slots, start: dict, a0: float, shares: Sequence[float]) -> tuple[dict, float]:
        """Coordinate descent over the weight grids from `start` and over the target's `shares`
        from `a0`, on the halves' estimated variance: (weights, target share)."""

        def variance(weights: dict, share: float) -> float:
            on = {i: w for i, w in weights.items() if w > 0}
            return _objective(halves, [0] + list(on), [share] + _alphas(on, share))[0]

        best, best_a0 = dict(start), a0
        best_var = variance(best, best_a0)
        for _ in range(SWEEPS):
            moved = False
            for j, grid in [*slots, (None, shares)]:  # None: the target's share
                for value in grid:
                    trial, trial_a0 = (best, value) if j is None else ({**best, j: value}, best_a0)
                    if value == (best_a0 if j is None else best[j]) or not any(w > 0 for w in trial.values()):
                        continue
                    var = variance(trial, trial_a0)
                    if var < best_var:
                        best, best_a0, best_var, moved = trial, trial_a0, var, True
            if not moved:
                break
        return best, best_a0

    def _adopt(self, chosen: dict, share: float, keys: list[str], new: dict, fingerprint, version) -> None:
        """Make the chosen candidate the state: its weights, its target share, and for the adapter
        and the tilt the new one, the current one, or none (a learnt component at weight 0 retires)."""
        new_at = {j: (kind, path) for kind, (j, path) in new.items()}
        weights, files = {}, {kind: None for kind in LEARNT}
        for j, w in chosen.items():
            if j in new_at:
                kind, path = new_at[j]
                files[kind] = (path, True)
            else:
                kind = keys[j]
                if kind in LEARNT:
                    files[kind] = (self.state[kind], False)
            weights[kind] = float(w)
        # Starting components not in this run (other categories) keep what they had learnt.
        kept = {k: w for k, w in self.state["weights"].items() if k not in keys and k not in LEARNT}
        self.state["weights"] = {**kept, **weights}
        self.state["target_share"] = float(share)
        checkpoint = {"fingerprint": fingerprint, "version": version}
        for kind, model_key in ((ADAPTER_KEY, "model"), (TILT_KEY, "tilt_model")):
            if files[kind] is None:
                self.state[kind], self.state[model_key] = None, None
            elif files[kind][1]:
                self.state[kind] = str(files[kind][0].relative_to(self.folder))
                self.state[model_key] = checkpoint
        self.state["generation"] = self.generation + 1

    def _prune(self) -> None:
        """Keep the current adapter's folder and tilt file only (an engine that loaded an older
        one keeps it in memory)."""
        for sub, kind in ((ADAPTERS_DIR, ADAPTER_KEY), (TILTS_DIR, TILT_KEY)):
            root = self.folder / sub
            if not root.is_dir():
                continue
            keep = self.state.get(kind)
            for d in root.iterdir():
                if str(d.relative_to(self.folder)) == keep:
                    continue
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink(missing_ok=True)


def _judge_spec(judge) -> str | None:
    """The judge's spec as files record it: an endpoint judge's URL may carry a key."""
    spec = judge.spec if isinstance(judge, Judge) else judge
    return None if spec is None else mask_secrets(spec, pairs=False)


def _alphas(weights: dict, a0: float) -> list[float]:
    total = sum(w for w in weights.values() if w > 0)
    return [(1 - a0) * w / total for w in weights.values() if w > 0]


def _objective(halves: Sequence[_Half], cols: list[int], alphas: list[float]) -> tuple[float, float]:
    """(sum over prompts of n Var(p_hat), mean ESS of w h per sample) of the mixture (`cols`,
    `alphas`), estimated from the halves' samples (`tailmon.proposals.tuning`'s formulas)."""
    if not halves:
        return math.nan, math.nan
    var, ess = 0.0, []
    for h in halves:
        p, m2, m1 = candidate_moments(h.logq, h.union, h.scores, cols, alphas)
        var += stratified_variance(m2, m1, alphas)
        ess.append(p * p / m2 if m2 > 0 else 0.0)
    return var, float(np.mean(ess))


def default_state_dir(root: str | os.PathLike, monitor: str) -> Path:
    """`ROOT/adaptive/<monitor>`: where a monitor keeps its learnt state by default."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in monitor)
    return Path(root) / "adaptive" / safe
