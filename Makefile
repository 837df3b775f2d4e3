# make demo  — set up and run the demo job on synthetic data (local SQLite tracking store)
# make test  — set up, check the import contract (lint-imports) and run the test suite (what .ci/run calls)
# make server — a tracking server on 127.0.0.1:5000 (ARGS='--backend-store-uri postgresql://…' for a team)
# make bench — run the speed benchmarks (prints tables)
# make docs  — serve the documentation site on http://127.0.0.1:8000 (mkdocs serve; edits reload)
# make docs-build — build the site strictly into site/ (broken links and anchors fail it; .ci/run runs it)
# make bench-accuracy — cross-validated accuracy on real crops (../shared/data/smids-dev by default; hours on a CPU)
# make lock  — re-resolve constraints.txt (the lock every environment installs from) after a change to pyproject.toml
#              (ARGS=--upgrade: every pin to the newest version allowed)
# make test-latest — the suite in .venv-highest on the newest versions pyproject allows (make test-lowest: the lowest)

PYTHON ?= python3
export NO_MKDOCS_2_WARNING := 1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The lock: exact versions of everything, compiled by uv from pyproject.toml for any platform and Python it allows.
# make setup, the MLflow project's environments (conda.yaml) and CI all install with it as pip constraints.
LOCK := constraints.txt
UV_COMPILE = uv pip compile pyproject.toml --extra dev --extra docs --universal --python-version 3.11 --quiet
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup system demo test test-latest test-lowest lock docs docs-build bench bench-accuracy server clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c $(LOCK) -e '.[dev,docs]'
	touch $(STAMP)

setup: $(STAMP)

lock: setup
	$(UV_COMPILE) $(ARGS) --custom-compile-command 'make lock' -o $(LOCK)

# The suite on another resolution than the lock's, in a venv of its own: the newest versions pyproject allows
# (test-latest), or the lowest it allows for the direct dependencies (test-lowest). The environment check
# compares with that resolution (SMIDS_ML_LOCK), so only real breakage fails.
test-latest: RESOLUTION := highest
test-lowest: RESOLUTION := lowest-direct
test-latest test-lowest: setup system
	test -x $(VENV)-$(RESOLUTION)/bin/python || $(PYTHON) -m venv $(VENV)-$(RESOLUTION)
	$(UV_COMPILE) --resolution $(RESOLUTION) --upgrade -o $(VENV)-$(RESOLUTION)/constraints.txt
	$(VENV)-$(RESOLUTION)/bin/python -m pip install -q --disable-pip-version-check \
		-c $(VENV)-$(RESOLUTION)/constraints.txt -e '.[dev,docs]'
	SMIDS_ML_LOCK=$(VENV)-$(RESOLUTION)/constraints.txt PATH=$(CURDIR)/$(VENV)-$(RESOLUTION)/bin:$$PATH \
		$(VENV)-$(RESOLUTION)/bin/python -m pytest -q $(ARGS)

# nginx runs in the tests of deploy/nginx.conf (the reverse proxy in front of mlflow models serve); Chromium
# and its driver in the tests that open the HTML report in a real headless browser
SYSTEM_PACKAGES := nginx-light chromium chromium-driver
system:
	@{ command -v nginx && command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; } || \
		{ echo "the tests need $(SYSTEM_PACKAGES) (Debian packages; nginx and chromium elsewhere)"; exit 1; }

demo: setup
	bash scripts/demo.sh

test: setup system
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python -m pytest -q

docs: setup
	$(BIN)/mkdocs serve $(ARGS)

docs-build: setup
	$(BIN)/mkdocs build --strict --site-dir site

bench: setup
	$(BIN)/python -m benchmarks

server: setup
	$(BIN)/smids-ml server $(ARGS)

bench-accuracy: setup
	$(BIN)/python -m benchmarks.bench_accuracy $(ARGS)

clean:
	rm -rf $(VENV) $(VENV)-highest $(VENV)-lowest-direct mlruns mlflow.db optuna.journal data/synthetic site
