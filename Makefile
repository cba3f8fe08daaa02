# The two commands a new user needs: `make demo` and `make test`. Both set up .venv from scratch.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

setup: $(VENV)/.installed

demo: setup
	PYTHONUNBUFFERED=1 $(PY) scripts/demo.py --out outputs/demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) tests

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
