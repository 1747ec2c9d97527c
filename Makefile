# Two commands: `make test` and `make demo`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint format clean docs docs-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow and not gpu" tests
	$(PY) -m pytest --doctest-modules rlx_optax -p no:cacheprovider -q

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/run.py

# The documentation site (Sphinx): warnings are errors (broken references, pages left out).
docs: $(STAMP)
	$(PY) -m sphinx -b html -E -W --keep-going -q docs docs/_build/html
	@echo "site: docs/_build/html/index.html"

# Builds the site, then opens it in headless Chromium (Debian's chromium, installed if missing).
docs-check: docs
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	$(PY) -m pytest -m browser tests/test_docs.py -p no:cacheprovider -q

lint: $(STAMP)
	$(VENV)/bin/ruff check rlx_optax tests benchmarks examples
	$(VENV)/bin/ruff format --check rlx_optax tests benchmarks examples

format: $(STAMP)
	$(VENV)/bin/ruff format rlx_optax tests benchmarks examples
	$(VENV)/bin/ruff check --fix rlx_optax tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache docs/_build docs/api/generated docs/notebooks docs/benchmarks
