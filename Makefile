# Two commands do everything (see README.md):
#   make demo   — create/reuse .venv, train the `small` preset on the Python stdlib, report
#                 validation loss, show nonzeros per matrix and a sample
#   make test   — create/reuse .venv, lint, run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SC := $(VENV)/bin/sparsecircuits
DEMO_RUN ?= runs/demo

.PHONY: demo test lint venv bench clean

$(VENV)/.installed: pyproject.toml constraints.txt setup.py $(wildcard src/sparsecircuits/kernels/csrc/*)
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: pip takes the CPU wheel on disk and never resolves a newer torch
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	# builds the compiled CPU kernels too (optional: without a compiler the torch fallback runs)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	@if [ -f $(DEMO_RUN)/train_config.json ]; then \
		$(SC) train --out $(DEMO_RUN) --resume; \
	else \
		$(SC) train --preset small --out $(DEMO_RUN); \
	fi
	$(SC) info $(DEMO_RUN)/model
	$(SC) sample $(DEMO_RUN)/model --prompt 'def read_config(path):' --max-new-tokens 64

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
