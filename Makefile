# Two commands set up everything on a bare machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STACK  := $(PY) infra/local/stack.py
# torch is installed first, at pyproject.toml's pin, from TORCH_INDEX: the CPU wheels by default, so
# pip never pulls PyPI's CUDA build and its NVIDIA wheels onto a CPU machine. TORCH_INDEX= (empty)
# takes whatever pip's own configuration finds. An http(s) index that does not answer is skipped for
# pip's default sources (a machine with a local wheel or mirror). The project's install keeps the
# torch it finds, since X+cpu satisfies ==X.
TORCH_VERSION := $(shell sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
TORCH_INDEX   ?= https://download.pytorch.org/whl/cpu
CHROMIUM      := /usr/bin/chromium

.PHONY: install chromium up down status demo evaluate test test-fast smoke clean-local

# Re-installs only when pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -z "$(TORCH_INDEX)" ]; then $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	elif ! expr "$(TORCH_INDEX)" : 'https*://' >/dev/null || $(PY) -c "import sys, urllib.request; \
	    urllib.request.urlopen(sys.argv[1], timeout=15)" "$(TORCH_INDEX)" 2>/dev/null; then \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX)"; \
	else echo "torch: $(TORCH_INDEX) does not answer; torch==$(TORCH_VERSION) from pip's default sources" >&2; \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; fi
	$(PY) -m pip install -q -e '.[stack,test]'
	@touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the MLflow UI test (Debian's package; apt-get needs root or sudo once).
chromium:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else echo "chromium: $(CHROMIUM) is missing; install it once as root: apt-get install chromium" >&2; exit 1; fi; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

# WORKERS=N: Ray worker nodes beside the head (default 2); see docs/cluster.md.
up: install
	$(STACK) up $(if $(WORKERS),--workers $(WORKERS))

down:
	@test -x $(PY) && $(STACK) down || true

status: install
	$(STACK) status

smoke: up
	. .local/stack.env && $(PY) jobs/smoke.py

demo: up
	infra/local/demo.sh

# Re-evaluate the latest trained model (after `make demo`).
evaluate: up
	infra/local/demo.sh evaluate

test: install chromium
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not stack"

clean-local: down
	rm -rf .local
