# MinT mesh. `make demo` and `make test` do all the set-up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
MINT   := $(VENV)/bin/mint
TORCH  ?= torch==2.13.0
# A second, small venv with what `pip install mindlab-toolkit==0.2.0` really brings: its pinned
# tinker 0.22.0 (JSON forward_backward) and their own dependencies, no torch (tinker 0.22 takes
# it only as an extra). It cannot share $(VENV), whose tinker is 0.38 (tests/test_tinker022.py).
VENV022 ?= .venv-tinker022
PY022   := $(VENV022)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test fuzz protos lint gpu-check bench-kernels clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build on local disk; pyproject keeps a range for GPU users.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	# MinT's SDK (the `mint` module): it pins tinker 0.22, and works over 0.38 (the Tinker API's tests).
	$(PY) -m pip install -q --no-deps mindlab-toolkit==0.2.0
	touch $@

$(VENV022)/.installed: Makefile
	test -x $(PY022) || python3 -m venv $(VENV022)
	$(PY022) -m pip install -q --upgrade pip
	$(PY022) -m pip install -q tinker==0.22.0 mindlab-toolkit==0.2.0
	touch $@

install: $(VENV)/.installed $(VENV022)/.installed

demo: install
	$(MINT) demo

# PYTHONSAFEPATH: `python -m` (pytest here, and the CLI the tests start) must not put the
# checkout first on sys.path, where kernels/ would shadow the `kernels` package transformers uses.
test: install lint
	PYTHONSAFEPATH=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The differential kernel tests with many more (random) examples than CI runs.
fuzz: install
	PYTHONSAFEPATH=1 MINT_HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -m fuzz $(PYTEST_ARGS)

protos: install
	$(PY) -m mintmesh.protogen

# ruff is pinned in pyproject (the formatter's output changes between releases).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# On a machine with an NVIDIA GPU: the kernel tests compiled (no interpreter) and the kernel
# benchmark on CUDA. Exits cleanly with a message elsewhere.
gpu-check: install
	$(PY) -m mintmesh.bench.gpu_check

clean:
	rm -rf build dist *.egg-info .pytest_cache
