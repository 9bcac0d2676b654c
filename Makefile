# The two commands of the README. Both set up everything first (idempotent):
#   make quant   build the quant of the embedded default model (dvc repro)
#   make test    run the test suite (what CI runs)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin

.PHONY: setup quant test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

quant: setup
	PATH="$(BIN):$$PATH" dvc repro

test: setup
	PATH="$(BIN):$$PATH" python -m pytest
