# The two set-up commands of the README: `make all_figures` and `make test`. Each creates the
# virtual environment from the pinned requirements when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: env all_figures test lint clean-results

$(BIN)/.installed: requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

env: $(BIN)/.installed

all_figures: $(BIN)/.installed
	$(BIN)/snakemake --cores $(CORES) all_figures

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/snakemake --lint

clean-results:
	rm -rf results/* .snakemake
	touch results/.gitkeep
