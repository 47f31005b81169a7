# Pyramid Flow: every target sets itself up (venv + pinned requirements) on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

RUN ?= digits_demo
CKPT ?= logs/train/runs/$(RUN)/checkpoints/last.ckpt
PROMPTS ?= configs/prompts/digits_canonical.txt
OUT ?= logs/train/runs/$(RUN)/videos
ARGS ?=
VAE_CKPT ?= checkpoints/vae_digits.safetensors

.PHONY: help install data vae latents train train-vae smoke sample eval ablations vbench-env bench test test-slow test-gpu test-full lint format clean clean-logs

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0  # CPU build first: a bare torch pulls a CUDA build
	$(BIN)/pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the pinned requirements

data: $(STAMP) ## render the moving-digits dataset to webdataset shards (if missing)
	@[ -f data/shards/digits/train/manifest.json ] || $(BIN)/python scripts/make_shards.py digits --out data/shards/digits

vae: data ## train the digits causal VAE (about 30 min on 2 cores, two phases) unless $(VAE_CKPT) exists
	@[ -f $(VAE_CKPT) ] || ( \
	  $(BIN)/python src/train.py experiment=vae_digits ckpt_path=last model.export.path=null && \
	  $(BIN)/python src/train.py experiment=vae_digits_17f model.export.path=$(VAE_CKPT) )
	@echo "VAE export:   $(VAE_CKPT) (weights + latent statistics)"

latents: vae ## pre-extract VAE latents + text features of the digits shards (data=digits_latents)
	$(BIN)/python src/extract.py autoencoder=causal_vae_digits autoencoder.checkpoint=$(VAE_CKPT) $(ARGS)

train: data ## train the CPU digits demo end to end, then sample the canonical prompts
	$(BIN)/python src/train.py run_name=$(RUN) ckpt_path=last $(ARGS)
	$(BIN)/python src/sample.py ckpt_path=$(CKPT) prompts_file=$(PROMPTS) out_dir=$(OUT) run_name=$(RUN)
	@echo "Checkpoint:   $(CKPT)"
	@echo "Videos:       $(OUT)/*.mp4 (+ samples.jsonl, strip.png)"
	@echo "Metrics:      logs/train/runs/$(RUN)/csv/metrics.csv"

train-vae: vae ## the digits demo in the learned VAE's latent space (RUN=digits_vae)
	$(MAKE) train RUN=$(if $(filter digits_demo,$(RUN)),digits_vae,$(RUN)) ARGS="autoencoder=causal_vae_digits $(ARGS)"

smoke: $(STAMP) ## seconds-long tiny training run
	$(BIN)/python src/train.py experiment=tiny run_name=smoke paths.data_dir=data/smoke $(ARGS)

sample: $(STAMP) ## sample CKPT=... PROMPTS=... OUT=...
	$(BIN)/python src/sample.py ckpt_path=$(CKPT) prompts_file=$(PROMPTS) out_dir=$(OUT) $(ARGS)

SUITE ?= digits
eval: $(STAMP) ## evaluate CKPT=... on SUITE=digits: videos + report.json/report.md next to the checkpoint
	$(BIN)/python src/eval.py ckpt_path=$(CKPT) suite=$(SUITE) $(ARGS)

ABLATIONS ?= stages corrective coupled temporal ratios
ablations: data ## digits ablation sweeps at equal FLOPs, 3 seeds, resumable (ABLATIONS="stages ...") + reports in docs/ablations/
	@for a in $(ABLATIONS); do \
	  d=logs/train/multiruns/ablation_$$a; \
	  $(BIN)/python src/train.py -m experiment=ablation_$$a hydra.sweep.dir=$$d $(ARGS) || exit 1; \
	  for j in $$d/[0-9]*; do \
	    if [ -f $$j/DONE.json ] && [ ! -f $$j/eval/digits/report.json ]; then \
	      $(BIN)/python src/eval.py ckpt_path=$$j/checkpoints/last.ckpt suite=digits || exit 1; \
	    fi; \
	  done; \
	  $(BIN)/python src/report.py sweep_dir=$$d name=$$a || exit 1; \
	done

vbench-env: ## a separate .venv-vbench with the vbench package (its pins conflict with ours)
	bash scripts/vbench_env.sh

bench: $(STAMP) ## speed ratios (pyramid vs K=1, temporal pyramid vs full sequence), write docs/benchmarks.md
	$(BIN)/python scripts/bench.py $(ARGS)

test: $(STAMP) ## CPU test suite (no network, no weights)
	$(BIN)/python -m pytest -m "not slow and not gpu" -q --timeout=600 $(ARGS)

test-slow: $(STAMP) ## subprocess and longer tests
	$(BIN)/python -m pytest -m "slow" -q --timeout=1800 $(ARGS)

test-gpu: $(STAMP) ## CUDA tests (skipped with a reason without a GPU)
	$(BIN)/python -m pytest -m "gpu" -q -rs $(ARGS)

test-full: $(STAMP) ## everything
	$(BIN)/python -m pytest -q --timeout=1800 $(ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: $(STAMP) ## ruff format + fixes
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

clean-logs: ## remove training logs
	rm -rf logs/train logs/sample logs/debug

clean: clean-logs ## remove logs, generated data and caches
	rm -rf data/shards data/smoke .pytest_cache .ruff_cache
