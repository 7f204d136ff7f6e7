"""LoRA proposals trained by tailmon: fitted to data, and by the cross-entropy method (CEM).

A LoRA proposal q is the target plus a peft adapter, sampled with the target's decoding (without
its truncation, see `LoraProposal`), so training maximises the log-likelihood under exactly that
distribution: log_softmax(logits / T) of the target's temperature T, summed over response tokens
(the stop token included when the response is complete), the prompt rendered as production
renders it (the target's system prompt).

**From data**: pairs of (prompt, response) text. A `response` is a whole reply, so its stop token
is trained too; a `target` (the AdvBench CSV's affirmative opening, "Sure, here is ...") is only
the opening of one, so it is not. Responses longer than max_new_tokens are cut there, as the
proposal will never sample beyond it.

**By CEM**: the zero-variance proposal for P(x) = E_p[h] is q*(y|x) = p(y|x) h(x,y) / P(x).
Each round draws samples from the current proposal mixture (the target with the defensive share,
and in round 1 the starting proposals, later the previous round's adapter), weights each by
v = w h (balance-heuristic weight times judge score) and fits the adapter to maximise
sum v log q, an importance-sampling estimate of -KL(q* || q) up to a constant, less a penalty
that keeps q covering the target (`LoraSettings.kl`, see `_Trainer`). The weights are
normalised within each prompt, so that every prompt's q* counts alike whatever its P(x) (the
adapter is shared by all prompts; a prompt with larger P would otherwise dominate it). After
each round a pilot set, drawn apart from the training samples and never fitted, estimates the
variance of the IS estimator with the new adapter (and the ESS of w h), so one sees it fall; the
figures of the starting mixture are round 0. With `CemSettings.until_flat` the rounds stop after
the first one whose pilot beats no earlier round (round 0 included) on either figure, and the
output is the adapter of the round with the lowest pilot variance (`stopped` in the metadata).

**Output folder**: a peft adapter (adapter_config.json, adapter_model.safetensors) usable as
`lora:DIR`, with `tailmon_lora.json` (format tailmon-lora/1): `base_model` (ref, the hashes the
engine checks: architecture_sha256, tokenizer_sha256, chat_template_sha256, weights_fingerprint,
and model_sha256 of config and tokenizer), `target` (system prompt, decoding), `judge`, `data`
(file, sha256, pairs), `cem` (start specs, prompts, samples, defensive), `lora` (rank, alpha,
modules, lr, steps, batch size, kl), `seed`, `stages` (per stage: losses; per CEM round: training
hits, pilot variance, ESS of w h, p_hat), `created`, `tailmon_version`. Each finished stage is
kept under `stages/`, and `train_state.json` holds the settings and figures so far: rerunning the
same command after an interruption continues after the last finished stage, with the same
result as an uninterrupted run (every random draw is seeded from the seed and the stage, and
the adapter is saved in float32 exactly).
"""

from __future__ import annotations

import copy
import csv
import datetime
import hashlib
import inspect
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from tailmon import __version__
from tailmon.engines.adapters import ADAPTER_FORMAT, ADAPTER_METADATA
from tailmon.engines.base import Variant
from tailmon.engines.steering import model_sha256
from tailmon.errors import InputError
from tailmon.estimators import importance_sampling

from .sampling import derive_seed, draw
from .spec import parse_proposal
from .variants import LoraProposal

STATE_FORMAT = "tailmon-lora-train/1"
STATE_FILE = "train_state.json"
STAGES_DIR = "stages"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# Seed tags: independent random streams for each use.
_TRAIN, _PILOT, _FIT, _INIT = 1, 2, 3, 4


# -- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    complete: bool
    """True for a whole reply (its stop token is trained), False for an opening."""


_PROMPT_FIELDS = ("prompt", "goal", "instruction")


def _pair(record, where: str) -> Pair:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object with 'prompt' and 'response' (or 'goal' and 'target')")
    prompt = next((record[f] for f in _PROMPT_FIELDS if f in record), None)
    if "response" in record:
        response, complete = record["response"], True
    elif "target" in record:
        response, complete = record["target"], False
    else:
        raise InputError(f"{where}: no 'response' (a whole reply) or 'target' (an opening) field")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: no prompt text (a 'prompt', 'goal' or 'instruction' field)")
    if not isinstance(response, str) or not response:
        raise InputError(f"{where}: the response text is empty or not a string")
    return Pair(prompt, response, complete)


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    """Training pairs from JSONL or a JSON list of objects, or CSV with a header.

    Each record has its prompt in `prompt` (or `goal`, `instruction`) and either `response`, a
    whole reply, or `target`, an opening such as AdvBench's "Sure, here is ..." (`goal,target`).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read training data {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"training data {path} is not UTF-8 text ({exc.reason})") from None
    name = path.name.lower()
    pairs: list[Pair] = []
    if name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for number, row in enumerate(reader, 2):
            pairs.append(_pair(row, f"{path}:{number}"))
    elif name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of objects")
        pairs = [_pair(r, f"{path}[{i}]") for i, r in enumerate(data)]
    else:  # JSONL (.jsonl, .ndjson or anything else)
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            pairs.append(_pair(record, f"{path}:{number}"))
    if not pairs:
        raise InputError(f"{path}: no training pairs")
    return pairs


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def texts_sha256(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


# -- settings ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSettings:
    """The adapter and its optimiser."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None
    """None: peft's default modules for the model type (q_proj and v_proj for Llama)."""
    lr: float = 1e-3
    steps: int = 50
    """Optimiser steps per stage (the data fit, and each CEM round)."""
    batch_size: int = 8
    """Sequences per optimiser step, drawn with probability proportional to their weight."""
    kl: float = 0.25
    """beta of the KL(p || q) penalty at every response position (see `_Trainer`); 0: none."""

    def __post_init__(self):
        if int(self.rank) != self.rank or self.rank < 1:
            raise InputError(f"rank must be an integer >= 1, got {self.rank}", setting="rank")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise InputError(f"alpha must be > 0, got {self.alpha}", setting="alpha")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be > 0, got {self.lr}", setting="lr")
        if int(self.steps) != self.steps or self.steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {self.steps}", setting="steps")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise InputError(f"batch size must be an integer >= 1, got {self.batch_size}", setting="batch_size")
        if not (math.isfinite(self.kl) and self.kl >= 0):
            raise InputError(f"kl must be >= 0, got {self.kl}", setting="kl")
        if self.target_modules is not None and not self.target_modules:
            raise InputError("target modules must name at least one module", setting="target_modules")


@dataclass(frozen=True)
class CemSettings:
    """The cross-entropy method's rounds."""

    prompts: tuple[str, ...]
    judge: str
    """Judge spec (the judge object is passed separately; the spec is what the metadata records)."""
    start: tuple[str, ...] = ()
    """Proposal specs sampled in round 1 together with the target (and the data-fitted adapter)."""
    rounds: int = 3
    samples: int = 64
    """Training samples per prompt and round."""
    pilot_samples: int = 64
    """Pilot samples per pilot prompt and round (never fitted)."""
    pilot_prompts: tuple[str, ...] | None = None
    """None: the training prompts, with their own independent draws."""
    defensive: float = 0.1
    until_flat: bool = False
    """Stop after the first round whose pilot shows neither a lower variance nor a higher ESS of
    w h than the best round before it; the output is then that best round's adapter."""

    def __post_init__(self):
        if not self.prompts:
            raise InputError("CEM needs prompts", setting="prompts")
        if int(self.rounds) != self.rounds or self.rounds < 1:
            raise InputError(f"rounds must be an integer >= 1, got {self.rounds}", setting="rounds")
        for name, value in (("samples", self.samples), ("pilot_samples", self.pilot_samples)):
            if int(value) != value or value < 2:
                raise InputError(f"{name.replace('_', ' ')} must be an integer >= 2, got {value}", setting=name)
        if not 0 <= self.defensive < 1:
            raise InputError(f"defensive must be in [0, 1), got {self.defensive}", setting="defensive")
        if self.pilot_prompts is not None and not self.pilot_prompts:
            raise InputError("the pilot prompt set is empty")

    @property
    def pilot(self) -> tuple[str, ...]:
        return self.prompts if self.pilot_prompts is None else self.pilot_prompts


# -- the trainer --------------------------------------------------------------------------------------


@dataclass
class _Example:
    prompt_ids: list[int]
    response_ids: list[int]
    weight: float


class _Trainer:
    """A training copy of the engine's base model with one trainable adapter.

    A copy, because the engine keeps serving the target (and loads each round's adapter by path
    to sample from it) while the adapter trains; peft would otherwise inject the training adapter
    into the very model that scores p. Costs one more copy of the base weights while training.

    The loss of a response is its negative log-likelihood under q plus beta times
    KL(p || q) of the next-token distributions at each of its positions, p being the target (the
    same model with the adapter off). Per position, with a free q, the minimum is
    q = (empirical + beta p) / (1 + beta): the fitted proposal keeps at least beta / (1 + beta) of
    the target's own distribution everywhere. Without it, CEM fitted to the handful of harmful
    samples of a first round copies their particular continuations and all but drops the
    target's others, which the IS weights then never see (on the tiny test model, an event of
    P = 1.6e-3 came out at 3.7e-4 with a pilot variance that looked excellent). The penalty keeps
    q mass-covering, as importance sampling needs; it costs one more forward pass without
    gradients per step.
    """

    def __init__(self, engine, temperature: float, settings: LoraSettings, seed: int, resume_from: str | None):
        from peft import LoraConfig, PeftModel, get_peft_model

        base = copy.deepcopy(engine.model)
        if isinstance(base, PeftModel):  # adapters the engine loaded: drop them from the copy
            base = base.base_model.unload()
        for p in base.parameters():
            p.requires_grad_(False)
        self.temperature = float(temperature)
        self.settings = settings
        self.device = next(base.parameters()).device
        self.pad = min(engine.stop_token_ids)
        if resume_from is not None:
            self.model = PeftModel.from_pretrained(base, resume_from, is_trainable=True)
        else:
            torch.manual_seed(derive_seed(seed, _INIT))  # the LoRA A matrices are random
            config = LoraConfig(r=int(settings.rank), lora_alpha=float(settings.alpha), lora_dropout=0.0,
                                target_modules=list(settings.target_modules) if settings.target_modules else None)
            try:
                self.model = get_peft_model(base, config)
            except ValueError as exc:
                raise InputError(f"cannot put a LoRA adapter on model {engine.model_id}: {exc}") from None
        self.model.eval()  # no dropout anywhere: the fit is a deterministic function of its seed
        params = inspect.signature(self.model.get_base_model().forward).parameters
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _losses(self, batch: list[_Example]) -> torch.Tensor:
        """The loss of each response: NLL under the proposal's sampling distribution (+ the KL penalty)."""
        seqs = [e.prompt_ids + e.response_ids for e in batch]
        width = max(map(len, seqs))
        x = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        # Right padding under causal attention: real positions never see the padding.
        x = x.to(self.device)
        # The logits at position t predict token t + 1: only the response positions need the
        # vocabulary projection (prompts are the longer part, and the projection a large one).
        first = min(len(e.prompt_ids) for e in batch) - 1
        kwargs = {"use_cache": False}
        if self._keep_kw:
            kwargs[self._keep_kw] = torch.arange(first, width - 1, device=self.device)
        else:
            first = 0
        logits = self.model(input_ids=x, **kwargs).logits
        base = None
        if self.settings.kl > 0:
            with torch.no_grad(), self.model.disable_adapter():
                base = self.model(input_ids=x, **kwargs).logits
        out = []
        for i, e in enumerate(batch):
            start = len(e.prompt_ids) - 1 - first
            span = slice(start, start + len(e.response_ids))
            logq = torch.log_softmax(logits[i, span].float() / self.temperature, dim=-1)
            target = torch.tensor(e.response_ids, device=logq.device)
            loss = -logq.gather(1, target[:, None]).sum()
            if base is not None:
                logp = torch.log_softmax(base[i, span].float() / self.temperature, dim=-1)
                loss = loss + self.settings.kl * (logp.exp() * (logp - logq)).sum()
            out.append(loss)
        return torch.stack(out)

    def fit(self, examples: list[_Example], seed: int, progress: bool, desc: str,
            deadline: float | None = None) -> tuple[float, float]:
        """Maximise sum_i v_i log q(y_i) over the adapter: minibatches drawn with probability v_i / sum v
        (an unbiased gradient of the weighted objective that spends no steps on weight-0 samples).

        Returns the mean minibatch loss of the first and of the last steps (a fifth of them each,
        at least one): each minibatch loss is an unbiased estimate of the weighted loss, and a pass
        over all the samples to measure it exactly would cost more than the fit. With `deadline`
        (a `time.monotonic()` value) it stops after the step that passes it (at least one step);
        `steps_done` says how many ran.
        """
        from tqdm import tqdm

        v = np.array([e.weight for e in examples], dtype=np.float64)
        keep = np.flatnonzero(v > 0)
        examples = [examples[i] for i in keep]
        probs = v[keep] / v[keep].sum()
        rng = np.random.default_rng(seed)
        optimizer = torch.optim.AdamW(self.params, lr=self.settings.lr, weight_decay=0.0)
        losses = []
        for _ in tqdm(range(self.settings.steps), desc=desc, unit="step", file=sys.stderr, disable=not progress,
                      leave=False):
            idx = rng.choice(len(examples), size=self.settings.batch_size, replace=True, p=probs)
            loss = self._losses([examples[i] for i in idx]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if deadline is not None and time.monotonic() >= deadline:
                break
        self.steps_done = len(losses)
        k = max(1, len(losses) // 5)
        return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))

    def save(self, folder: Path) -> None:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)


# -- the run ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output: str
    metadata: dict
    resumed_from: int
    """Stages that were already done when this call started (0: a fresh run)."""

    @property
    def spec(self) -> str:
        return f"lora:{self.output}"


def _stage_names(has_data: bool, rounds: int) -> list[str]:
    return (["data"] if has_data else []) + [f"round-{k:03d}" for k in range(1, rounds + 1)]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _examples_from_pairs(engine, target: Variant, pairs: Sequence[Pair]) -> list[_Example]:
    tok = engine.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id in engine.stop_token_ids else min(engine.stop_token_ids)
    cap = target.decoding.max_new_tokens
    out = []
    for pair in pairs:
        ids = tok(pair.response, add_special_tokens=False)["input_ids"]
        ids = list(ids) + ([eos] if pair.complete else [])
        if not ids:
            raise InputError(f"the response to '{pair.prompt[:40]}' has no tokens")
        out.append(_Example(engine.prompt_ids(pair.prompt, target.system_prompt), ids[:cap], 1.0))
    return out


def pilot_figures(draws) -> dict:
    """IS figures of a pilot set: the variance of the mean over prompts, Var = sum_i SE_i^2 / m^2, its
    per-sample form (times the samples per prompt), mean p_hat, mean and smallest ESS of w h."""
    ests = [importance_sampling(d.log_w, d.scores, component=d.drawn, defensive=float(d.shares[0])) for d in draws]
    m = len(ests)
    n = ests[0].n_samples
    var = sum(e.std_error ** 2 for e in ests) / m ** 2
    return {
        "variance": _finite(var),
        "per_sample_variance": _finite(var * n),
        "p_hat": float(np.mean([e.p_hat for e in ests])),
        "ess_wh": float(np.mean([e.ess_wh for e in ests])),
        "min_ess_wh": float(min(e.ess_wh for e in ests)),
        "n_harmful": int(sum(e.n_harmful for e in ests)),
        "n_samples": int(n * m),
        "kl": _finite(float(np.mean([e.kl for e in ests if e.kl is not None]))) if any(e.kl is not None for e in ests) else None,
    }


def train_lora(engine, output: str | os.PathLike, *, target: Variant, settings: LoraSettings = LoraSettings(),
               seed: int = 0, pairs: Sequence[Pair] | None = None, data_source: dict | None = None,
               cem: CemSettings | None = None, judge=None, progress: bool = False,
               report: Callable[[str], None] | None = None, on_stage: Callable[[str, dict], None] | None = None
               ) -> TrainResult:
    """Train a LoRA proposal into `output` (see the module docstring), resuming a run left there.

    `pairs` fits the adapter to data first; `cem` (with `judge`, the object of `cem.judge`) then
    runs its rounds. `report` receives one line per finished stage; `on_stage(name, record)` is
    called after each stage is saved (an exception there leaves a resumable run).
    """
    from tqdm import tqdm

    if not pairs and cem is None:
        raise InputError("nothing to train: give training pairs, or CEM rounds with a judge and prompts")
    if cem is not None and judge is None:
        raise InputError("CEM needs a judge", setting="judge")
    if cem is not None and not cem.start and not pairs:
        raise InputError("CEM needs a starting proposal or training pairs to draw its first harmful samples "
                         "from: the target alone rarely produces them", setting="start")
    start = [parse_proposal(s) for s in (cem.start if cem else ())]
    say = report or (lambda line: None)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory", setting="output")
    stages_dir = out / STAGES_DIR

    facts = engine.base_facts()
    if facts is None:
        raise InputError(f"LoRA training needs an engine that reads its model's weights (the transformers engine), "
                         f"not the {engine.name} engine")
    d = target.decoding
    identity = {
        "base_model": {k: facts[k] for k in ("architecture_sha256", "tokenizer_sha256", "chat_template_sha256",
                                             "weights_fingerprint")},
        "target": {"system_prompt": target.system_prompt, "temperature": d.temperature, "top_p": d.top_p,
                   "top_k": d.top_k, "max_new_tokens": d.max_new_tokens},
        "lora": asdict(settings),
        "seed": int(seed),
        "data": None if not pairs else {"sha256": texts_sha256([json.dumps(asdict(p)) for p in pairs])},
        "cem": None if cem is None else {**{k: v for k, v in asdict(cem).items()
                                            if k not in ("rounds", "prompts", "pilot_prompts", "until_flat")},
                                         "prompts_sha256": texts_sha256(cem.prompts),
                                         "pilot_sha256": texts_sha256(cem.pilot)},
    }
    identity = json.loads(json.dumps(identity))  # tuples as lists: compared with what JSON gives back
    stages = _stage_names(bool(pairs), cem.rounds if cem else 0)
    state_path = out / STATE_FILE
    state = {"format": STATE_FORMAT, "settings": identity, "completed": [], "records": {}}
    if state_path.is_file():
        try:
            old = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{state_path}: unreadable training state ({exc}); use another output folder",
                             setting="output") from None
        if old.get("format") != STATE_FORMAT:
            raise InputError(f"{state_path} is not a tailmon LoRA training state; use another output folder",
                             setting="output")
        if old.get("settings") != identity:
            differ = sorted(k for k in identity if old.get("settings", {}).get(k) != identity[k])
            raise InputError(f"output {out} holds a training run with other settings ({', '.join(differ)}): "
                             "rerun it with the same ones to continue it, or use another output folder",
                             setting="output")
        state = old
        extra = [s for s in state["completed"] if s not in stages]
        if extra:
            raise InputError(f"output {out} already holds {len(state['completed'])} finished stages, more than the "
                             f"{len(stages)} asked for: ask for at least as many rounds, or use another output "
                             "folder", setting="output")
    elif out.is_dir() and any(out.iterdir()):
        raise InputError(f"output {out} is not empty and holds no training state: use a new folder",
                         setting="output")
    out.mkdir(parents=True, exist_ok=True)
    stages_dir.mkdir(exist_ok=True)
    done = list(state["completed"])
    resumed_from = len(done)
    if done:
        say(f"resuming {out}: {len(done)} of {len(stages)} stages already done ({', '.join(done)})")

    def stage_path(name: str) -> Path:
        return stages_dir / name

    def save_state():
        _write_json(state_path, state)

    trainer = None
    if len(done) < len(stages):
        trainer = _Trainer(engine, d.temperature, settings, seed,
                           resume_from=str(stage_path(done[-1])) if done else None)

    def finish_stage(name: str, record: dict, saved: bool = False):
        if not saved:
            trainer.save(stage_path(name))
        state["records"][name] = record
        state["completed"].append(name)
        save_state()
        if on_stage:
            on_stage(name, record)

    # -- the data stage
    if pairs and "data" not in done:
        examples = _examples_from_pairs(engine, target, pairs)
        before, after = trainer.fit(examples, derive_seed(seed, _FIT, 0), progress, "fitting data")
        record = {"stage": "data", "pairs": len(examples), "loss_before": before, "loss_after": after}
        finish_stage("data", record)
        say(f"data: {len(examples)} pairs, mean loss {before:.4g} -> {after:.4g}")

    # -- CEM rounds
    if cem is not None:
        def lora(name: str) -> Variant:
            return LoraProposal(str(stage_path(name))).variant(target)

        def pilot(variants: list[Variant], shares: list[float], desc: str) -> dict:
            with tqdm(total=len(cem.pilot) * cem.pilot_samples, desc=desc, unit="sample", file=sys.stderr,
                      disable=not progress, leave=False) as bar:
                draws = [draw(engine, x, variants, shares, cem.pilot_samples,
                              # one seed per prompt and component in every round: the target's
                              # draws are common to all rounds, which sharpens the comparison
                              lambda j, x=x: derive_seed(seed, _PILOT, x, j), judge, bar.update)
                         for x in cem.pilot]
            return pilot_figures(draws)

        def mixture(k: int) -> tuple[list[Variant], list[float], list[str]]:
            if k == 1:
                comps = [p.variant(target) for p in start] + ([lora("data")] if pairs else [])
                labels = [p.spec for p in start] + (["lora:(data fit)"] if pairs else [])
            else:
                comps, labels = [lora(f"round-{k - 1:03d}")], [f"lora:(round {k - 1})"]
            rest = (1 - cem.defensive) / len(comps)
            return [target] + comps, [cem.defensive] + [rest] * len(comps), labels

        if "start_pilot" not in state:
            variants, shares, labels = mixture(1)
            state["start_pilot"] = {"stage": "round-000", "mixture": labels, **pilot(variants, shares, "pilot (start)")}
            save_state()
        base_var = state["start_pilot"]["variance"]
        say(_round_line(0, cem.rounds, state["start_pilot"], base_var))
        for k in range(1, cem.rounds + 1):
            name = f"round-{k:03d}"
            if name in done:
                say(_round_line(k, cem.rounds, state["records"][name], base_var))
                continue
            if state.get("stopped"):
                say(f"stopped after {state['stopped']['after']}: {state['stopped']['reason']}")
                break
            variants, shares, labels = mixture(k)
            examples: list[_Example] = []
            hits = prompts_hit = 0
            with tqdm(total=len(cem.prompts) * cem.samples, desc=f"round {k}/{cem.rounds} sampling", unit="sample",
                      file=sys.stderr, disable=not progress, leave=False) as bar:
                for x in cem.prompts:
                    dr = draw(engine, x, variants, shares, cem.samples,
                              lambda j, x=x: derive_seed(seed, _TRAIN, k, x, j), judge, bar.update)
                    v = np.exp(dr.log_w) * dr.scores
                    hits += int(np.count_nonzero(v > 0))
                    if v.sum() > 0:
                        prompts_hit += 1
                        ids = engine.prompt_ids(x, target.system_prompt)
                        examples += [_Example(ids, r, float(vi / v.sum())) for r, vi in zip(dr.ids, v) if vi > 0]
            if not examples:
                raise InputError(f"CEM round {k}: none of the {len(cem.prompts) * cem.samples} samples was harmful "
                                 f"under judge '{cem.judge}', so there is nothing to fit: use a stronger starting "
                                 "proposal or more samples")
            before, after = trainer.fit(examples, derive_seed(seed, _FIT, k), progress, f"round {k}/{cem.rounds} fitting")
            trainer.save(stage_path(name))
            fig = pilot([target, lora(name)], [cem.defensive, 1 - cem.defensive], f"round {k}/{cem.rounds} pilot")
            record = {"stage": name, "mixture": labels, "train_samples": len(cem.prompts) * cem.samples,
                      "train_hits": hits, "prompts_with_hits": prompts_hit, "loss_before": before,
                      "loss_after": after, **fig}
            finish_stage(name, record, saved=True)
            say(_round_line(k, cem.rounds, record, base_var))
            if cem.until_flat:
                earlier = [state["start_pilot"]] + [state["records"][f"round-{i:03d}"] for i in range(1, k)]
                if not _improves(record, earlier):
                    state["stopped"] = {"after": name, "reason": "the pilot's variance and ESS of w*h stopped "
                                        "improving", "best": _best_round(state, k)}
                    save_state()
                    say(f"stopping: round {k}'s pilot improves on no earlier round "
                        f"(the adapter of {state['stopped']['best']} is the result)")
                    break

    # -- the final adapter and its metadata
    last = stage_path(state["stopped"]["best"] if state.get("stopped") else stages[-1])
    for fname in ADAPTER_FILES:
        src = last / fname
        if not src.is_file():
            raise InputError(f"stage folder {last} lacks {fname}: the run's state is damaged; use another output "
                             "folder", setting="output")
        tmp = out / f".{fname}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, out / fname)
    metadata = {
        "format": ADAPTER_FORMAT,
        "base_model": {"ref": engine.model_id, "model_sha256": model_sha256(engine.model, engine.tokenizer), **facts},
        "target": identity["target"],
        "judge": cem.judge if cem else None,
        "data": None if not pairs else {**(data_source or {}), "pairs": len(pairs),
                                        "sha256_of_pairs": identity["data"]["sha256"]},
        "cem": None if cem is None else {"start": list(cem.start), "rounds": cem.rounds, "prompts": len(cem.prompts),
                                         "pilot_prompts": None if cem.pilot_prompts is None else len(cem.pilot_prompts),
                                         "samples": cem.samples, "pilot_samples": cem.pilot_samples,
                                         "defensive": cem.defensive, "prompts_sha256": identity["cem"]["prompts_sha256"]},
        "lora": identity["lora"],
        "seed": int(seed),
        # in the order they happened: the data fit, the starting mixture's pilot (round 0), the rounds
        "stages": ([state["records"]["data"]] if pairs else []) + ([state["start_pilot"]] if "start_pilot" in state else [])
                  + [state["records"][s] for s in stages if s != "data" and s in state["records"]],
        "stopped": state.get("stopped"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tailmon_version": __version__,
    }
    _write_json(out / ADAPTER_METADATA, metadata)
    return TrainResult(str(out), metadata, resumed_from)


def _improves(record: dict, earlier: list[dict]) -> bool:
    """Whether a round's pilot beats every earlier one (round 0 included) on the variance or on
    the ESS of w h."""
    var = record.get("variance")
    best_var = min((r["variance"] for r in earlier if r.get("variance") is not None), default=None)
    best_ess = max(r["ess_wh"] for r in earlier)
    return (var is not None and (best_var is None or var < best_var)) or record["ess_wh"] > best_ess


def _best_round(state: dict, k: int) -> str:
    """The round (1..k) with the lowest pilot variance: the adapter an early stop keeps."""
    names = [f"round-{i:03d}" for i in range(1, k + 1)]
    return min(names, key=lambda n: (state["records"][n].get("variance") is None,
                                      state["records"][n].get("variance") or 0.0))


def _round_line(k: int, rounds: int, rec: dict, base_var: float | None) -> str:
    var = rec.get("variance")
    ratio = f" (x{var / base_var:.3g} of round 0)" if var is not None and base_var and k else ""
    train = f", {rec['train_hits']}/{rec['train_samples']} training samples harmful" if "train_hits" in rec else ""
    return (f"round {k}/{rounds}: pilot Var(p_hat) {var if var is None else f'{var:.3g}'}{ratio}, "
            f"ESS(w*h) {rec['ess_wh']:.1f}, p_hat {rec['p_hat']:.3g}{train}")
