# Two commands set up everything on a bare machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STACK  := $(PY) infra/local/stack.py

.PHONY: install up down status demo evaluate test test-fast smoke clean-local

# Re-installs only when pyproject.toml changed since the last install.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[stack,test]'
	@touch $(STAMP)

install: $(STAMP)

up: install
	$(STACK) up

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

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not stack"

clean-local: down
	rm -rf .local
