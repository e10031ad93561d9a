# `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The core alone (no plugins), for the tests that must pass without them.
CORE_VENV ?= .venv-core
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# torch 2.14.1 + torchvision 0.29.1 install from this machine's local files; other machines use PyPI.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-core test-all install clean

$(VENV)/.installed: pyproject.toml $(PLUGINS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[diffusers,test,ui,eval]" $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $@

$(CORE_VENV)/.installed: pyproject.toml
	test -x $(CORE_VENV)/bin/python || python3 -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install -q --upgrade pip
	$(CORE_VENV)/bin/pip install -q $(TORCH)
	$(CORE_VENV)/bin/pip install -q -e ".[diffusers,test,eval]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/zmagic demo --out outputs/demo

# Everything together: the core's tests, the integration tests (core + plugins), the web app's tests
# (tests/ui: its browser tests need chromium and chromedriver, which .ci/run installs), every plugin's tests.
test: install
	$(PY) -m pytest -q tests/core tests/integration tests/ui $(wildcard plugins/*/tests)

# The core's tests in a virtualenv that has the core (and its extras) but no plugin.
test-core: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/python -m pytest -q tests/core

test-all: test-core test

clean:
	rm -rf outputs .pytest_cache
