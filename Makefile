# make demo  — set up and run the demo job on synthetic data (local SQLite tracking store)
# make test  — set up, check the import contract (lint-imports) and run the test suite (what .ci/run calls)
# make server — a tracking server on 127.0.0.1:5000 (ARGS='--backend-store-uri postgresql://…' for a team)
# make bench — run the speed benchmarks (prints tables)
# make docs  — serve the documentation site on http://127.0.0.1:8000 (mkdocs serve; edits reload)
# make docs-build — build the site strictly into site/ (broken links and anchors fail it; .ci/run runs it)
# make bench-accuracy — cross-validated accuracy on real crops (../shared/data/smids-dev by default; hours on a CPU)

PYTHON ?= python3
export NO_MKDOCS_2_WARNING := 1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup system demo test docs docs-build bench bench-accuracy server clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,docs]'
	touch $(STAMP)

setup: $(STAMP)

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
	rm -rf $(VENV) mlruns mlflow.db optuna.journal data/synthetic site
