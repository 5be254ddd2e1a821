# kefu-triage: every target installs what it needs on first use (.venv + a stamp file), then runs offline.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-train-dev
EXPERIMENT ?= default
# the shipped model is the fine-tuned one: the distilled student is not yet as good on real messages
# (docs/distillation.md); `make distill` + `MODEL_DIR=$(STUDENT_DIR)` evaluates, exports and benches it instead
MODEL_DIR ?= models/$(EXPERIMENT)
STUDENT_DIR ?= models/$(EXPERIMENT)_student
ARTIFACT_DIR ?= artifacts/$(EXPERIMENT)
REPORT_DIR ?= reports/$(EXPERIMENT)
ARGS ?=

# Nothing may come from a model hub: fail fast instead of hanging on the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_EVALUATE_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONHASHSEED := 0

.PHONY: help install all data train distill eval export bench bench-train load-test regress test lint clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: python3.11 (or python3) not found on PATH" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,offline-encoder,serve,scale,dev]'
	@touch $@

install: $(STAMP)  ## create .venv and install the project (train + dev extras)

all: data train eval export bench  ## the whole default pipeline, offline: data -> train -> eval -> export -> bench

data: $(STAMP)  ## generate the embedded dataset: data/embedded/{train,dev,test}.jsonl + stats
	$(PY) -m kefu_triage.data $(ARGS)

train: $(STAMP)  ## fine-tune the default experiment (EXPERIMENT=smoke for a one-minute run)
	$(PY) -m kefu_triage.train experiment=$(EXPERIMENT) $(ARGS)

distill: $(STAMP)  ## distil the trained model (MODEL_DIR) into a 4-layer student (STUDENT_DIR)
	$(PY) -m kefu_triage.train.distill experiment=$(EXPERIMENT) distill.teacher_dir=$(MODEL_DIR) distill.publish_dir=$(STUDENT_DIR) $(ARGS)

eval: $(STAMP)  ## evaluate MODEL_DIR on the test split, tune the triage policy, write reports
	$(PY) -m kefu_triage.evaluate model_dir=$(MODEL_DIR) output_dir=$(REPORT_DIR) $(ARGS)

export: $(STAMP)  ## export MODEL_DIR to the ONNX artifact in ARTIFACT_DIR (parity-gated)
	$(PY) -m kefu_triage.export model_dir=$(MODEL_DIR) output_dir=$(ARTIFACT_DIR) $(ARGS)

bench: $(STAMP)  ## CPU latency/throughput/memory: PyTorch eager vs ONNX fp32/int8 (ARGS="teacher_model_dir=..." adds a teacher)
	$(PY) -m kefu_triage.bench model_dir=$(MODEL_DIR) artifact_dir=$(ARTIFACT_DIR) output_dir=$(REPORT_DIR) $(ARGS)

bench-train: $(STAMP)  ## training throughput and peak memory per encoder
	$(PY) -m kefu_triage.bench.training $(ARGS)

load-test: $(STAMP)  ## HTTP server under 1/8/32/64 concurrent clients on loopback (vs --max-batch 1)
	$(PY) -m kefu_triage.bench.load --artifact $(ARTIFACT_DIR) --output $(REPORT_DIR)/load.json $(ARGS)

regress: $(STAMP)  ## compare REPORT_DIR/metrics.json with a baseline (BASELINE=...)
	$(VENV)/bin/kefu-triage regress --baseline $(or $(BASELINE),tests/baselines/smoke_metrics.json) --current $(REPORT_DIR)/metrics.json

test: $(STAMP)  ## run the test suite (offline, CPU, no ../shared needed)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)  ## ruff: formatting and lint rules (CI runs this before the tests)
	$(VENV)/bin/ruff format --check src tests scripts
	$(VENV)/bin/ruff check src tests scripts

clean:  ## remove generated data, outputs, models, artifacts and reports (keeps .venv)
	rm -rf data outputs multirun models artifacts reports .pytest_cache
