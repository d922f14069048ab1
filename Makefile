# Two commands for a fresh machine (see README):
#   make demo   — a small RAT+ pretraining run on CPU on the embedded default corpus
#   make test   — the CPU test-suite (what CI runs)
# Both create .venv and install the package with its dependencies on first use.

PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/python -m pip
# CPU machines here carry this torch build on local disk; on GPU clusters use docker/Dockerfile.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test install lint clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install
	$(VENV)/bin/ratplus-pretrain recipes/tiny-cpu.yaml $(ARGS)

test: install
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

lint: install
	$(VENV)/bin/ruff check megatron_ratplus kernels tests tools

clean-demo:
	@echo "the demo writes under runs/tiny-cpu and data_cache/; remove them yourself if you want a fresh run"
