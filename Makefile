# `make run` and `make test` work on a fresh machine: each creates .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PRESET ?= default
WORKSPACE ?= workspace

.PHONY: run study results test test-slow lint install browser clean

$(BIN)/consort: pyproject.toml requirements/overrides.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, with pip: pip finds the CPU build on this machine's disk (uv would fetch CUDA).
	$(BIN)/pip install --quiet --upgrade pip uv
	$(BIN)/pip install --quiet torch==2.13.0
	# uv for the rest: prefect 3.9.1 pins a certifi release the index does not serve yet, and
	# only uv can override a dependency's pin (requirements/overrides.txt).
	$(BIN)/uv pip install --quiet --python $(BIN)/python --override requirements/overrides.txt -e '.[test]'
	touch $(BIN)/consort

install: $(BIN)/consort

# Then docs/results/<preset>.md: the run's seconds per stage and the report's tables, generated.
run: install
	$(BIN)/consort run --preset $(PRESET) --workspace $(WORKSPACE)
	$(BIN)/python -m flows.results_page $(WORKSPACE) docs/results/$(PRESET).md

# The FlexOlmo study on SmolLM2 (issue 32), in its own workspace: docs/results/study.md and its time split.
study:
	$(MAKE) run PRESET=study WORKSPACE=workspace-study

# The results page again, from the last run (make run writes it).
results: install
	$(BIN)/python -m flows.results_page $(WORKSPACE) docs/results/$(PRESET).md

# The trace page is tested in a real headless Chromium: Debian's, driven by Selenium.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing Debian's chromium and chromium-driver for the page test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# Lint and import order (ruff), and the import contract of pyproject.toml (import-linter).
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# pytest exits 5 when it collected no test: that is a failure, never a pass.
test: install browser lint
	$(BIN)/python -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$status

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(WORKSPACE)
