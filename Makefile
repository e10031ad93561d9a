# `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The core alone (no plugins), for the tests that must pass without them.
CORE_VENV ?= .venv-core
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# torch 2.14.1 + torchvision 0.29.1 install from this machine's local files; other machines use PyPI.
TORCH := torch==2.14.1 torchvision==0.29.1
# torch with its CUDA libraries is several GB: it is installed once, into TORCH_SITE, and both
# virtualenvs see it through a .pth file (pip counts it as installed, so it is not fetched twice).
TORCH_SITE ?= .torch-site

.PHONY: demo test test-core test-all install clean

# $(call venv_with_torch,VENV): make the virtualenv, install torch into TORCH_SITE once, link it in
# (and torch's console script torchrun, whose copy in TORCH_SITE/bin names another python).
define venv_with_torch
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	test -f $(TORCH_SITE)/.installed || { $(1)/bin/pip install -q --upgrade --target $(TORCH_SITE) $(TORCH) && touch $(TORCH_SITE)/.installed; }
	$(1)/bin/python -c "import site, sys; open(site.getsitepackages()[0] + '/zmagic-torch-site.pth', 'w').write(sys.argv[1] + '\n')" "$(abspath $(TORCH_SITE))"
	printf '#!/bin/sh\nexec "$$(dirname "$$0")/python" -m torch.distributed.run "$$@"\n' > $(1)/bin/torchrun && chmod +x $(1)/bin/torchrun
endef

$(VENV)/.installed: pyproject.toml $(PLUGINS)
	$(call venv_with_torch,$(VENV))
	$(PIP) install -q -e ".[diffusers,test,ui,eval]" $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $@

$(CORE_VENV)/.installed: pyproject.toml
	$(call venv_with_torch,$(CORE_VENV))
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
