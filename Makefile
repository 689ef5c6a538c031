# forgeline: `make demo` runs the pipeline on the bundled sample; `make test` runs lint + tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FORGELINE_HOME ?= $(CURDIR)/.forgeline
export PREFECT_HOME ?= $(FORGELINE_HOME)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo test lint ui sample bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

sample: $(STAMP)
	$(BIN)/forgeline sample data/sample

demo: sample
	$(BIN)/forgeline run configs/demo.yaml
	$(BIN)/forgeline rag configs/demo.yaml --eval
	$(BIN)/forgeline serve configs/demo.yaml --once --port 8765

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -rs

ui: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf runs .forgeline data/sample
