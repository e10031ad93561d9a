# `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# torch 2.14.1 + torchvision 0.29.1 install from this machine's local files; other machines use PyPI.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml $(PLUGINS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[diffusers,test]" $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/zmagic demo --out outputs/demo

test: install
	$(PY) -m pytest -q tests $(wildcard plugins/*/tests)

clean:
	rm -rf outputs .pytest_cache
