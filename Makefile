# vit-vs-cnn: `make sweep` runs the default comparison, `make test` checks the suite.
# Every target installs what it needs into .venv on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

# Variables (`make TARGET NAME=value`); `make help` lists each with its `## ` line and its default.
## the Python that creates .venv
PYTHON ?= python3
## the sweep: experiments/sweeps/SWEEP.yaml
SWEEP ?= default
## local (this machine) or slurm (job arrays through submitit)
EXECUTOR ?= local
## local executor: runs at once, as worker processes sharing the cores
MAX_PARALLEL ?= 1
## more experiments.sweep flags, e.g. "--retry-failed -v" or "--partition gpu --array-parallelism 32"
SWEEP_ARGS ?=
## where runs are written: RUNS/SWEEP/RUN_ID/
RUNS ?= runs
## where reports are written: RESULTS/SWEEP/
RESULTS ?= results
## train-cpu: the net
MODEL ?= resnet50
## train-cpu: the share of the training set
FRACTION ?= 1.0

.DEFAULT_GOAL := help

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: help install data test test-slow test-all sweep sweep-dry plots tables report train-cpu clean
.PHONY: sync agent

help: ## List the targets and the variables
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-11s %s\n", $$1, $$2}'
	@echo "Variables (make TARGET NAME=value; default in brackets):"
	@awk '/^## / {doc = substr($$0, 4); next} /^[A-Z_]+ \?=/ && doc != "" {name = $$1; value = $$0; \
		sub(/^[A-Z_]+ \?= ?/, "", value); printf "  %-13s [%s] %s\n", name, value, doc} {doc = ""}' $(MAKEFILE_LIST)

install: $(VENV)/.installed ## Create .venv with pinned torch==2.14.1 / torchvision==0.29.1 and the suite

data: ## Install Debian's dataset-fashion-mnist when apt is available and the files are missing
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist/"; \
	elif ! command -v apt-get >/dev/null; then \
		echo "Fashion-MNIST: no apt here; torchvision downloads it on first use (needs network)"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "Fashion-MNIST: installing Debian's package needs root: run \`sudo make data\`" \
			"(or sudo apt-get install dataset-fashion-mnist), or let torchvision download it on first use" \
			"(needs network)"; \
	elif (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; then \
		echo "Fashion-MNIST installed from Debian: /usr/share/datasets/fashion-mnist/"; \
	else \
		echo "Fashion-MNIST: apt-get could not install dataset-fashion-mnist (not in this system's archive?);" \
			"torchvision downloads it on first use (needs network)"; \
	fi

## test: pytest worker processes (the fast tests are independent; each worker uses one thread)
TEST_WORKERS ?= 2

test: install ## Run the test suite (fast tests; no network, no GPU)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

test-slow: install ## Run only the slow end-to-end tests (kill/resume, concurrent runners, submitit, 224 px)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadscope

test-all: install ## Run every test, the slow end-to-end ones too
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m ""

sweep: install data ## Run a sweep (SWEEP=default EXECUTOR=local|slurm), then the report
	@status=0; $(PY) -m experiments.sweep experiments/sweeps/$(SWEEP).yaml --executor $(EXECUTOR) \
		--max-parallel $(MAX_PARALLEL) --runs-dir $(RUNS) $(SWEEP_ARGS) || status=$$?; \
	if [ $$status -ne 2 ] && [ "$(EXECUTOR)" = local ]; then \
		$(PY) -m analysis report --sweep $(SWEEP) --runs-dir $(RUNS) --results-dir $(RESULTS) --wandb auto || exit $$?; \
	fi; exit $$status

sweep-dry: install ## Print the runs a sweep would launch and which are done
	$(PY) -m experiments.sweep experiments/sweeps/$(SWEEP).yaml --dry-run --runs-dir $(RUNS)

plots: install ## Regenerate the figures of SWEEP from its runs
	$(PY) -m analysis plots --sweep $(SWEEP) --runs-dir $(RUNS) --results-dir $(RESULTS)

tables: install ## Regenerate the tables of SWEEP from its runs
	$(PY) -m analysis tables --sweep $(SWEEP) --runs-dir $(RUNS) --results-dir $(RESULTS)

report: install ## Regenerate results/SWEEP/ (tables, figures, report.md) from its runs
	$(PY) -m analysis report --sweep $(SWEEP) --runs-dir $(RUNS) --results-dir $(RESULTS)

train-cpu: install data ## One CPU-profile run (MODEL, FRACTION)
	$(PY) -m experiments.train --profile cpu --model $(MODEL) --train-fraction $(FRACTION)

clean: ## Remove runs/ and results/ (keeps .venv)
	rm -rf $(RUNS) $(RESULTS)

# W&B: offline runs (no credentials, or WANDB_MODE=offline) are uploaded by `make sync`; a W&B sweep made with
# `.venv/bin/wandb sweep experiments/sweeps/$(SWEEP).yaml` is run by `make agent SWEEP_ID=...`, whose
# `${interpreter}` (a bare `python`) is then this .venv's.
## agent: the W&B sweep to serve, ENTITY/PROJECT/ID (printed by wandb sweep)
SWEEP_ID ?=
## agent: how many runs it takes (empty: until the sweep ends)
COUNT ?=

sync: install ## Upload every offline W&B run (runs/, results/) with wandb sync, then their lineage
	$(PY) -m experiments.tracking sync --runs-dir $(RUNS) --results-dir $(RESULTS)

agent: install ## Run a W&B sweep agent in .venv (SWEEP_ID=ENTITY/PROJECT/ID from wandb sweep; COUNT=N runs)
	@if [ -z "$(SWEEP_ID)" ]; then echo "make agent: SWEEP_ID not set (allowed: ENTITY/PROJECT/ID, printed by" \
		"$(VENV)/bin/wandb sweep experiments/sweeps/$(SWEEP).yaml)" >&2; exit 2; fi
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/wandb agent $(if $(COUNT),--count $(COUNT)) $(SWEEP_ID)

# Speed: `make bench` measures the nets and where their time goes (experiments/bench.py); on a GPU machine
# benchmarks/gpu_check.sh runs the gpu profile and short training runs within 8 minutes.
PROFILE ?= cpu
BENCH_ARGS ?=
.PHONY: bench

bench: install ## Training/inference speed and where it goes (PROFILE=cpu|gpu, BENCH_ARGS=--quick) -> benchmarks/results/
	$(PY) -m experiments.bench --profile $(PROFILE) $(BENCH_ARGS)
