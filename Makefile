PYTHON ?= python
# torch is pinned first so pip takes the CPU build that ships on this kind of machine
# instead of resolving an unpinned torch to a multi-GB CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
# The versions the test suite last passed with (`make lock` refreshes it): `make demo` and `make test` install exactly
# these. `pip install nanovlm` users get setup.cfg's ranges instead; CI also tests their newest and oldest ends.
CONSTRAINTS ?= constraints.txt
PIP_INSTALL_FLAGS ?=

.PHONY: install demo test test-fast bench lint lock print-torch-spec

install:
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet $(PIP_INSTALL_FLAGS) --constraint "$(CONSTRAINTS)" -e ".[test]"

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

# Resolve the newest releases setup.cfg allows in a fresh virtualenv, run the whole suite on them, and only if it
# passes write them to constraints.txt.
lock:
	bash .ci/lock

print-torch-spec:
	@echo "$(TORCH_SPEC)"
