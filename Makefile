# Two commands for a newcomer (see README): `make study` and `make test`.
VENV ?= .venv
SHARED_MNIST := $(abspath ../shared/data/mnist)
# Use the canonical files beside the checkout when they are there; otherwise the loader's own
# search (ART_STUDY_DATA_DIR, the Keras cache, Keras' download) applies.
DATA_ENV := $(if $(wildcard $(SHARED_MNIST)/*.gz),ART_STUDY_DATA_DIR=$(SHARED_MNIST),)
CONFIG ?= configs/paper.yaml

# What the tests need from the system, from Debian: chromium (the browser test drives it through
# Playwright; browsers are never downloaded), PostgreSQL's server programs (the MLflow-server
# test starts a throw-away cluster with initdb) and Fashion-MNIST (dataset-fashion-mnist: the
# dataset tests load its IDX files from /usr/share/datasets/fashion-mnist). Installed with apt-get only when missing, as
# root (sudo when not root), so `make test` passes on a fresh Debian machine by itself.
TEST_DEB_PACKAGES := chromium postgresql dataset-fashion-mnist

.PHONY: install study test test-deps lint
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

test-deps:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| missing="$$missing postgresql"; \
	[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
		|| missing="$$missing dataset-fashion-mnist"; \
	if [ -n "$$missing" ]; then \
		if ! command -v apt-get >/dev/null; then \
			echo "make test-deps: the tests need$$missing; install them (Debian: $(TEST_DEB_PACKAGES))" >&2; \
			exit 1; \
		fi; \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		echo "make test-deps: installing$$missing with apt-get"; \
		$$sudo apt-get update -q && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# Two workers, one test file each at a time (module fixtures stay in one process): tracing a
# model is Python-bound and about half of the suite's time, so two processes overlap it. (Their
# TensorFlow keeps its default thread count: results depend on it, and the Ray test compares
# a Ray worker's metrics with the in-process ones bit for bit.)
test: test-deps lint
	$(DATA_ENV) $(VENV)/bin/pytest -n 2 --dist loadfile
