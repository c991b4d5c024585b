# Two commands set up everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ARGS   ?=

.PHONY: install data train test test-all bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Fashion-MNIST (real data, offline): the default data of `make train`.
data:
	@test -f $(FMNIST) || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist; see README 'Data'"

train: install data
	$(BIN)/python src/train.py experiment=quickstart $(ARGS)

test: install data
	$(BIN)/ruff check src tests experiments
	$(BIN)/python -m pytest -m "not slow" -q $(ARGS)

test-all: install data
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/python experiments/bench.py --net unet_s --device cpu $(ARGS)

lint: install
	$(BIN)/ruff check src tests experiments

clean:
	rm -rf $(VENV) logs .pytest_cache
