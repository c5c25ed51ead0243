# Two set-up commands on a fresh machine with Python 3.11 and make: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-chaos lint bench clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/controlplane dev

# The browser tests (tests/console) drive Debian's Chromium (or CP_CHROMIUM) through Playwright;
# installed with apt-get when missing and we are root. `make run` does not need it.
chromium:
	sh scripts/ensure-chromium.sh

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-chaos: $(STAMP)
	CP_CHAOS_TASKS=1000 CP_FUZZ_CASES=2000 CP_BAD_INPUT_EXAMPLES=2000 $(BIN)/python -m pytest -q -s -m chaos

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# bench/lifecycle.py runs ours, then the hand-written PostgreSQL baseline, and prints the ratio; 1000 tasks
# each keeps it to ~1-2 min (bench/RESULTS.md records runs of 2000).
bench: $(STAMP) chromium
	$(BIN)/python bench/append.py
	$(BIN)/python bench/lifecycle.py --tasks 1000
	$(BIN)/python bench/recovery.py
	$(BIN)/python bench/replay.py
	$(BIN)/python bench/policy.py
	$(BIN)/python bench/console.py
	$(BIN)/python bench/client.py
	$(BIN)/python bench/schedules.py

clean:
	rm -rf $(VENV) .controlplane .pytest_cache
