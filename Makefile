# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints.txt
BIN         := $(VENV)/bin
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test install data browser bench bench-int8 bench-lowbit bench-distill bench-prune clean

$(BIN)/kdq: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev,tensorboard]'
	@touch $@

install: $(BIN)/kdq

# Fashion-MNIST comes from Debian's package where we may install it; kdq itself also
# looks in $$KDQ_DATA and ~/.cache/kdq and can download the files (see README).
data:
	@if [ -d $(FASHION_DIR) ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
		|| echo "make: could not install dataset-fashion-mnist; kdq will look elsewhere or download"; \
	else echo "make: run 'sudo apt-get install dataset-fashion-mnist' or let kdq download Fashion-MNIST"; fi

# Headless Chromium renders HTML pages in tests/report (browser.py); those tests skip without it.
# Debian's package is about a minute and 600 MB on disk with its libraries; installed once.
browser:
	@if [ -n "$$KDQ_CHROMIUM" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
		|| command -v google-chrome >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "make: installing chromium for the browser tests (about a minute, 600 MB)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "make: could not install chromium; the browser tests will be skipped"; \
	else echo "make: no chromium: run 'sudo apt-get install chromium' or set KDQ_CHROMIUM, else the browser tests skip"; fi

demo: install data
	$(BIN)/kdq run examples/quickstart.yaml --out runs/quickstart

# The import-layer contracts in pyproject.toml first: a broken layer fails before any test runs.
test: install data browser
	@if [ -x $(BIN)/lint-imports ]; then $(BIN)/lint-imports --no-cache --no-logo; \
	else echo "make: lint-imports needs Python 3.11+; the import layers are not checked"; fi
	$(BIN)/python -m pytest -q

bench: install data
	$(BIN)/python bench/pipeline.py

# About an hour on 2 cores: trains seed 004's pipeline plus a ResNet-20 student, then measures
bench-int8: install data
	$(BIN)/python bench/int8.py --out runs/seed004

# About an hour on 2 cores: issue 4's low-bit recipes at 16/8/4/2/1 bits over two seeds, then quantizers
bench-lowbit: install data
	$(BIN)/python bench/lowbit.py --out runs/lowbit

# About 70 minutes on 2 cores: every distillation method over 3 seeds, then a timing pass
bench-distill: install data
	$(BIN)/python bench/distill.py --out runs/bench-distill

# About an hour on 2 cores: pruning curves over 2 seeds, speed in PyTorch and ONNX Runtime, the journey
bench-prune: install data
	$(BIN)/python bench/prune.py --out runs/bench-prune

clean:
	rm -rf $(VENV) runs .pytest_cache
