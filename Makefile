# The two quick-start commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
# pip's own progress (what it downloads and builds) stays visible: the first install takes minutes.
PIP     = $(VENV)/bin/pip --disable-pip-version-check

.PHONY: run test install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Installs aitrain (torch pinned to the local CPU build through constraints.txt).
install: $(VENV)/bin/python
	@echo "== installing aitrain and its dependencies (torch, hydra-core, mlflow, numpy) into $(VENV)"
	$(PIP) install --progress-bar on -c constraints.txt -e .
	@echo "== installed: $$($(VENV)/bin/aitrain --version)"

# Installs aitrain and runs the default job: 2 local ranks, built-in GPT, MLflow under outputs/.
run: install
	@echo "== running the default job: aitrain launch"
	$(VENV)/bin/aitrain launch

# Installs what the tests need (Python extras, and Debian packages when root) and runs the suite.
test:
	bash scripts/test.sh

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache *.egg-info
