# The two quick-start commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip -q --disable-pip-version-check

.PHONY: run test install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Installs aitrain (torch pinned to the local CPU build through constraints.txt).
install: $(VENV)/bin/python
	$(PIP) install -c constraints.txt -e .

# Installs aitrain and runs the default job: 2 local ranks, built-in GPT, MLflow under outputs/.
run: install
	$(VENV)/bin/aitrain launch

# Installs what the tests need (Python extras, and Debian packages when root) and runs the suite.
test:
	bash scripts/test.sh

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache *.egg-info
