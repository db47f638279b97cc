# The two commands of the README. Both set themselves up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,fast]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/microte sim scenarios/community.toml --ledger sqlite:///microte-demo.db
	@$(BIN)/microte report sqlite:///microte-demo.db --out microte-demo-report

test: $(STAMP)
	$(BIN)/ruff check market participants controller ledger tests bench
	$(BIN)/mypy market participants controller ledger
	$(BIN)/lint-imports
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/clearing.py

clean:
	rm -rf $(VENV) *.db *.db-wal *.db-shm microte-demo-report
