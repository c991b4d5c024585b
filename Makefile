# Two commands set up everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ARGS   ?=
# pytest-xdist workers of `make test` (one thread each: tests/conftest.py)
JOBS   ?= 2

.PHONY: install data train ldm test test-all bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps k-diffusion==0.1.1.post1 dctorch==0.1.2  # parity reference (pyproject)
	touch $(STAMP)

install: $(STAMP)

# Debian's Fashion-MNIST (real data, offline): the default data of `make train`.
data:
	@test -f $(FMNIST) || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist; see README 'Data'"

train: install data
	$(BIN)/python src/train.py experiment=quickstart $(ARGS)

# Latent diffusion, both stages: the kl-f4 autoencoder, then the LDM on its latents (GPU: ~1 h; CPU: many hours,
# shorten with STAGE1_ARGS='trainer.max_steps=2100 model.loss.disc_start=1500 data.batch_size=32' ARGS=...).
STAGE1_DIR := $(CURDIR)/logs/ldm/stage1
STAGE1_ARGS ?=
ldm: install data
	test -f $(STAGE1_DIR)/checkpoints/last.ckpt || \
	  $(BIN)/python src/train.py experiment=autoencoder_kl_f4 hydra.run.dir=$(STAGE1_DIR) $(STAGE1_ARGS)
	$(BIN)/python src/train.py experiment=ldm model.autoencoder_ckpt=$(STAGE1_DIR)/checkpoints/last.ckpt $(ARGS)

test: install data
	$(BIN)/ruff check src tests experiments
	$(BIN)/ruff format --check src tests experiments
	$(BIN)/python -m pytest -m "not slow" -q -n $(JOBS) --dist worksteal $(ARGS)

test-all: install data
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal $(ARGS)

bench: install
	$(BIN)/python experiments/bench/run.py --net unet_s --device cpu $(ARGS)

lint: install
	$(BIN)/ruff check src tests experiments
	$(BIN)/ruff format --check src tests experiments

clean:
	rm -rf $(VENV) logs .pytest_cache
