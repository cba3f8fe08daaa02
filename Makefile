# The two commands a new user needs: `make demo` and `make test`. Both set up .venv from scratch.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Two pytest-xdist workers: in one process the suite keeps about one core busy (single-threaded tests, and
# subprocesses that spend most of their time importing, one after another), so on the 2-core CI machine two workers
# take its time from 28 to 16.5-22.5 minutes (2026-12-07). PYTEST_WORKERS=0 runs every test in one process.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS))

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

setup: $(VENV)/.installed

demo: setup
	PYTHONUNBUFFERED=1 $(PY) scripts/demo.py --out outputs/demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(XDIST) $(PYTEST_ARGS) tests

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
