# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Setup creates .venv in the repo root. Without a CUDA GPU it installs the CPU build of torch
# (TORCH_CPU_SPEC; set TORCH_INDEX=https://download.pytorch.org/whl/cpu where PyPI would give a CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_GPU_SPEC ?= torch>=2.4
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup setup-test demo test test-slow gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q \
		$(if $(HAS_GPU),"$(TORCH_GPU_SPEC)","$(TORCH_CPU_SPEC)") $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The tests also exercise the optional spconv backend (CPU wheel); skipped cleanly where it cannot install.
# One test opens the pipeline's report.html in headless Chromium: installed from the distribution's packages when
# apt-get exists and we are root, best-effort (never fails setup); without it that test skips.
setup-test: setup
	@$(if $(HAS_GPU),true,$(PY) -c "import spconv" 2>/dev/null || $(PY) -m pip install -q "spconv>=2.3" || echo "spconv not installed: its tests will skip")
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
				|| echo "chromium not installed: the headless-browser report test will skip"; \
		else echo "chromium not installed (needs apt-get as root): the headless-browser report test will skip"; fi; }

demo: setup
	$(VENV)/bin/haskd demo

# `make test` skips the tests marked slow (pyproject addopts); `make test-slow` runs only those (long real-data runs).
test: setup-test
	$(PY) -m pytest -q

test-slow: setup-test
	$(PY) -m pytest -q -m slow

# The prepared GPU check (README, "GPU check"): on a CUDA machine whose python3 has torch and haskd's dependencies;
# installs nothing (such machines often have no network). OUT: where gpu_check.json goes; ROOMS: optional prepared
# scene root to tile into ScanNet-sized rooms (default: synthetic rooms).
OUT ?= gpu_check
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) scripts/gpu_check.py --out $(OUT) $(if $(ROOMS),--rooms $(ROOMS))

clean:
	rm -rf $(VENV) runs build *.egg-info
