# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv/ first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := true

.PHONY: setup test demo clean

setup: $(STAMP)

# torch 2.13.0 goes in first and alone: it is the CPU build pip finds on this machine, and any
# later requirement that accepts 2.13.0 leaves it in place instead of pulling a CUDA build.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

DEMO := demo_run
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/unsafe-experts tiny-model --family olmoe $(DEMO)/tiny-olmoe
	$(BIN)/unsafe-experts flip-dataset $(DEMO)/flip_advbench.json --mode chars --n 64
	$(BIN)/unsafe-experts train --model_name $(DEMO)/tiny-olmoe \
		--dataset_path $(DEMO)/flip_advbench.json --output_dir $(DEMO)/out \
		--num_rounds 3 --top_k_experts 8 --batch_size 8 --expert_lr 1e-3 --router_lr 1e-3

clean:
	rm -rf $(DEMO)
