# make demo  — set up and run the demo job on synthetic data (local SQLite tracking store)
# make test  — set up and run the test suite (what .ci/run calls)
# make server — a tracking server on 127.0.0.1:5000 (ARGS='--backend-store-uri postgresql://…' for a team)
# make bench — run the speed benchmarks (prints tables)
# make bench-accuracy — cross-validated accuracy on real crops (../shared/data/smids-dev by default; hours on a CPU)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup system demo test bench bench-accuracy server clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# nginx runs in the tests of deploy/nginx.conf (the reverse proxy in front of mlflow models serve)
system:
	@test -x /usr/sbin/nginx || command -v nginx >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; } || \
		{ echo "nginx is needed by the tests: install nginx-light (Debian) or nginx"; exit 1; }

demo: setup
	bash scripts/demo.sh

test: setup system
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks

server: setup
	$(BIN)/smids-ml server $(ARGS)

bench-accuracy: setup
	$(BIN)/python -m benchmarks.bench_accuracy $(ARGS)

clean:
	rm -rf $(VENV) mlruns mlflow.db optuna.journal data/synthetic
