# The README's two commands. Each sets itself up from nothing on a fresh machine.
#   make demo   the main job: a real pretrained model explained (JupyterLab once the widget lands)
#   make test   creates .venv, installs torch==2.13.0 (the CPU build on disk) first, then the project
#               with its test extras, and runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nbattr-installed
JS_BUNDLE := nbattr/static/widget.js

.PHONY: test demo bench lint clean js chromium

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

# the widget's JS (js/src) bundled by esbuild into nbattr/static/ (gitignored)
js: $(JS_BUNDLE)

$(JS_BUNDLE): js/package.json $(wildcard js/src/*)
	cd js && npm install --no-audit --no-fund && npm run build

# Debian's Chromium for the browser tests (Playwright never downloads a browser here); in CI its absence fails them
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium) \
	  || echo "chromium could not be installed: browser tests are skipped locally and fail in CI"

test: $(STAMP) js chromium
	$(PY) -m pytest

demo: $(STAMP) js
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/bench_captum.py

lint: $(STAMP)
	$(PY) -m ruff check nbattr tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info js/node_modules nbattr/static
