# Two commands for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck venv clean browser constraints wheel

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/cem demo

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python scripts/typecheck.py
	$(BIN)/pytest -q -n 2 --dist loadscope -m "not one_core"
	$(BIN)/pytest -q -m one_core

typecheck: $(STAMP)
	$(BIN)/python scripts/typecheck.py

# The dashboard's browser tests drive the distribution's Chromium (never a downloaded one).
# As root with apt, install it when missing; otherwise those tests skip and say how to enable.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver for the browser tests"; \
	  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "could not install chromium: the browser tests will be skipped"; \
	else echo "no /usr/bin/chromium: the browser tests are skipped (as root: apt-get install chromium chromium-driver)"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the versions the suite passed with, for reproducible installs (pip install -c constraints.txt .)
constraints: $(STAMP)
	{ echo "# Versions the test suite passed with (Python 3.11): pip install -c constraints.txt '.[dev]'"; \
	  echo "# Regenerate after a dependency change: make constraints"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -e '^-e' -e '^s2-cem' -e '@ file'; } > constraints.txt

# a wheel in dist/ (example sites, register maps and the demo data inside)
wheel: $(STAMP)
	$(BIN)/pip wheel --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
