# Two commands a new user needs: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
TESTDEPS := $(VENV)/.test-installed

.PHONY: venv test demo bench clean

$(RUNTIME): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(TESTDEPS): $(RUNTIME) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

venv: $(RUNTIME)

test: $(TESTDEPS)
	$(PY) -m pytest -q tests

demo: $(RUNTIME)
	$(PY) -m kmcl_jax.main --config=configs/synthetic.py --workdir=runs/demo

bench: $(RUNTIME)
	$(PY) -m kmcl_jax.benchmarks.losses
	$(PY) -m kmcl_jax.benchmarks.input_pipeline --source=synthetic

clean:
	rm -rf $(VENV) runs .pytest_cache
