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
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: setup test test-fast demo robustness-full compare clean

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

# everything (CI runs this); test-fast leaves out the tests marked slow (real servers,
# torchrun, kill-and-resume, DVC repro, whole flows)
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The pipeline on the built-in demo: a tiny OLMoE and FlipAttack-style records, both built
# offline by DVC stages; Prefect runs in-process, MLflow writes to ./mlflow.db. Each table once:
# train leaves the evaluation table to `report`, the robustness stage prints its own, and
# metrics/robustness.md (over 200 columns) is not printed.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro train robustness
	@echo
	$(BIN)/unsafe-experts report outputs/gradient
	@echo
	@echo "The repair re-attacked: metrics/robustness.md (every figure), plots in metrics/robustness/"
	@echo
	@$(BIN)/python scripts/expected_demo.py
	@echo
	@$(BIN)/python scripts/where_to_look.py

# The repair of `make demo` re-attacked along the whole budget axes, 48 prompts per set
# (the demo runs small budgets on 16); docs/results.md has what it cost.
robustness-full: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro train
	$(BIN)/unsafe-experts robustness --params params.yaml --quiet --model outputs/gradient/final_model \
	  --reference build/organism/model --run_dir outputs/gradient --robust_limit 48 \
	  --router_budget 1 --router_budget 2 --router_budget 4 --router_budget 8 --router_budget 16 \
	  --gcg_step 5 --gcg_step 20 --gcg_step 50 --finetune_step 10 --finetune_step 40 \
	  --finetune_step 100 --harmful_examples 4 --harmful_examples 16 --harmful_examples 64 \
	  --out metrics/robustness_full.json --plots metrics/robustness_full
	@cat metrics/robustness_full.md

# The methods side by side (params.yaml comparison): 80 surgeries on five organism builds, 5
# ablations, 55 of the surgeries and three organisms re-attacked, then the table. The extra
# organism builds, the surgeries, the ablations and the re-attacks run as one Prefect flow on a
# local Dask cluster, one worker per core (`unsafe-experts grid`, flows/grid.py: a stage starts
# when what it depends on is done, and each is recorded in dvc.lock as `dvc repro` would;
# params.yaml's grid section sends them to a cluster); docs/results.md has what it cost.
compare: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro organism
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/unsafe-experts grid organism_builds@ recipe_builds@ surgery_data@ compare_run@ compare_ablate compare_robust compare_validate --params params.yaml
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro compare
	@cat metrics/comparison.md

clean:
	rm -rf build outputs metrics mlflow.db mlruns dvc.lock
