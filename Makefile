# The two commands: `make demo` and `make test`. Each does all setup on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo screenshot test test-all lint bench install clean

# torch 2.14.1 / torchvision 0.29.1 are the releases this environment serves (lpips needs torchvision).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/lbm-reg demo --home $${LBM_REG_HOME:-demo-home}

# docs/mlflow-version-page.png from the demo workspace (headless Chromium; see docs/screenshot.py)
screenshot: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python docs/screenshot.py --home $${LBM_REG_HOME:-demo-home}

test: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -q

test-all: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check lbm_registry tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/cli_latency.py

clean:
	rm -rf $(VENV) demo-home .pytest_cache
