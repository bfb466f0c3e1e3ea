# One command to run the server, one to run the tests; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install --quiet --editable '.[test]'

run: venv
	$(BIN)/twistd --nodaemon --pidfile= mailserver $(if $(CONFIG),--config $(CONFIG))

test: venv
	$(BIN)/python -b -W error::BytesWarning -m pytest -n 2 $(PYTEST_ARGS)
