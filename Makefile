# The README's two commands. Each sets itself up from nothing on a fresh machine.
#   make demo   the main job: a real pretrained model explained (JupyterLab once the widget lands)
#   make test   creates .venv, installs torch==2.13.0 (the CPU build on disk) first, then the project
#               with its test extras, and runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nbattr-installed

.PHONY: test demo bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/bench_captum.py

lint: $(STAMP)
	$(PY) -m ruff check nbattr tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info
