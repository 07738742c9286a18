PYTHON ?= python
# torch is pinned first so pip takes the CPU build that ships on this kind of machine
# instead of resolving an unpinned torch to a multi-GB CUDA wheel.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast bench lint

install:
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -e ".[test]"

demo: install
	$(PYTHON) examples/finetune.py

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

bench: install
	$(PYTHON) benchmarks/run_all.py

# ruff is not a dependency of the package or its tests; the pin keeps findings the same on every machine.
RUFF_SPEC ?= ruff==0.17.6

lint:
	$(PYTHON) -m pip install --quiet "$(RUFF_SPEC)"
	$(PYTHON) -m ruff check .
