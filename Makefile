# Two entry points, each doing all set-up on a fresh machine:
#   make quickstart   — the main job: examples/quickstart.py
#   make test         — the test suite (what CI runs, through .ci/run)
# The venv sees system site-packages, so a machine that has torch keeps it; where there is none,
# the CPU build torch==2.13.0 is installed first (a bare `torch` would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test bench
setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

quickstart: setup
	TORCHINDUCTOR_COMPILE_THREADS=1 $(PY) examples/quickstart.py

test: setup
	TORCHINDUCTOR_COMPILE_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/run.py $(WHAT)
