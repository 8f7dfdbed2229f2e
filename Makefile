# Two commands do everything (see README.md):
#   make demo   — create/reuse .venv, then the whole story on the shipped stdlib-sparse model:
#                 the task table, prune single_double_quote to its circuit, validate it,
#                 analyze it, and open the dashboard on it (prints its URL).
#                 `make demo TRAIN=1` first trains the `small` preset and uses that model.
#   make test   — create/reuse .venv, lint, run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SC := $(VENV)/bin/sparsecircuits
DEMO_RUN ?= runs/demo
DEMO_TASK ?= single_double_quote
TRAIN ?= 0
ifeq ($(TRAIN),1)
DEMO_MODEL ?= $(DEMO_RUN)/train
else
DEMO_MODEL ?= stdlib-sparse
endif
CIRCUIT := $(DEMO_RUN)/$(DEMO_TASK)

.PHONY: demo test lint venv bench clean

$(VENV)/.installed: pyproject.toml constraints.txt setup.py $(wildcard src/sparsecircuits/kernels/csrc/*)
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: pip takes the CPU wheel on disk and never resolves a newer torch
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	# builds the compiled CPU kernels too (optional: without a compiler the torch fallback runs)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,hf]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	@if [ "$(TRAIN)" = 1 ]; then \
		if [ -f $(DEMO_RUN)/train/train_config.json ]; then \
			$(SC) train --out $(DEMO_RUN)/train --resume; \
		else \
			$(SC) train --preset small --out $(DEMO_RUN)/train; \
		fi; \
	fi
	$(SC) eval --model $(DEMO_MODEL)
	@# each step is skipped when its output exists, so a second `make demo` goes straight on
	@test -f $(CIRCUIT)/circuit.json || \
		$(SC) prune --task $(DEMO_TASK) --model $(DEMO_MODEL) --out $(CIRCUIT)
	@test -f $(CIRCUIT)/report.json || $(SC) validate $(CIRCUIT)
	@test -f $(CIRCUIT)/analysis.json || $(SC) analyze $(CIRCUIT)
	$(SC) viz $(CIRCUIT)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
