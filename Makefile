# The two set-up commands of the README: `make all_figures` and `make test`. Each creates the
# virtual environment from the pinned requirements when it is missing. `make fashion` runs
# config/fashion.yaml (real data on a CPU), installing Debian's Fashion-MNIST package first when
# it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: env all_figures test lint format clean-results fashion fashion-data

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

# Fashion-MNIST: Debian's package (or torchvision's FashionMNIST/raw files in data/)
FASHION_DEB := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
FASHION_RAW := data/FashionMNIST/raw/train-images-idx3-ubyte

fashion-data:
	@if [ -f $(FASHION_DEB) ] || [ -f $(FASHION_RAW) ] || [ -f $(FASHION_RAW).gz ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: install it with 'sudo apt-get install dataset-fashion-mnist'" \
		     "(or put torchvision's FashionMNIST/raw files in data/), then run 'make fashion' again"; \
		exit 1; \
	fi

fashion: fashion-data $(BIN)/.installed
	$(BIN)/snakemake all --cores $(CORES) --configfile config/fashion.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/snakefmt Snakefile rules

clean-results:
	rm -rf results/* .snakemake
	touch results/.gitkeep
