# Two commands for a newcomer (see README): `make study` and `make test`.
VENV ?= .venv
SHARED_MNIST := $(abspath ../shared/data/mnist)
# Use the canonical files beside the checkout when they are there; otherwise the loader's own
# search (ART_STUDY_DATA_DIR, the Keras cache, Keras' download) applies.
DATA_ENV := $(if $(wildcard $(SHARED_MNIST)/*.gz),ART_STUDY_DATA_DIR=$(SHARED_MNIST),)
CONFIG ?= configs/paper.yaml

.PHONY: install study test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,ray]'
	touch $@

study: install
	$(DATA_ENV) $(VENV)/bin/art-study run $(CONFIG)

lint: install
	$(VENV)/bin/ruff check art_study tests benchmarks

test: lint
	$(DATA_ENV) $(VENV)/bin/pytest
