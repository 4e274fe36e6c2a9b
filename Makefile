# Every target works on a fresh machine: it creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
SRC := tokfusion_jax convert configs tests benchmarks

.PHONY: install test lint format demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch==2.13.0 is the CPU wheel; a looser requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[convert,hub,tfds,dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(SRC)
	$(VENV)/bin/ruff format $(SRC)

# Both training stages on the bundled sample pairs with the packaged trained tokenizer (CPU,
# a few minutes), then the fused images and a metrics table against average/max fusion.
demo: $(STAMP)
	$(PY) -m tokfusion_jax.train --config=configs/ivif.py:demo --workdir=runs/demo

test: lint
	$(VENV)/bin/pytest -n 2 --dist loadgroup --durations=15 tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
