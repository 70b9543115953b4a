# Two commands a new user needs: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# JAX build: cpu, cuda12, cuda13 or tpu. tools/select_jax.py detects it (NVIDIA driver version
# from nvidia-smi, Cloud TPU from its PCI ids); override with `make demo JAX=cpu`.
ifndef JAX
JAX := $(shell $(PYTHON) tools/select_jax.py --name)
endif
JAX_REQUIREMENT := $(shell $(PYTHON) tools/select_jax.py $(JAX))
ifeq ($(JAX_REQUIREMENT),)
$(error JAX=$(JAX) is not a JAX build: use cpu, cuda12, cuda13 or tpu)
endif
# Accelerator plugins of the other builds, removed when a venv switches build.
JAX_PLUGINS := jax-cuda12-plugin jax-cuda12-pjrt jax-cuda13-plugin jax-cuda13-pjrt libtpu
RUNTIME := $(VENV)/.runtime-$(JAX)
TESTDEPS := $(VENV)/.test-installed

.PHONY: venv test lint demo bench clean

$(RUNTIME): requirements.txt pyproject.toml tools/select_jax.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(wildcard $(VENV)/.runtime-*),$(PY) -m pip uninstall --quiet --yes $(JAX_PLUGINS))
	rm -f $(VENV)/.runtime-*
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt '$(JAX_REQUIREMENT)'
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(TESTDEPS): $(RUNTIME) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

venv: $(RUNTIME)

lint: $(TESTDEPS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q tests

demo: $(RUNTIME)
	$(PY) -m kmcl_jax.main --config=configs/synthetic.py --workdir=runs/demo

bench: $(RUNTIME)
	$(PY) -m kmcl_jax.benchmarks.losses
	$(PY) -m kmcl_jax.benchmarks.input_pipeline --source=synthetic
	$(PY) -m kmcl_jax.benchmarks.train_step

clean:
	rm -rf $(VENV) runs .pytest_cache
