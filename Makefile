# make install: .venv with dbops and its tools (and the Debian packages the tests and sandbox use)
# make demo:    the bot on a sandbox fleet of real PostgreSQL clusters, no Slack needed
# make test:    lint, type checks and the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PG_BIN ?= /usr/lib/postgresql/15/bin

.PHONY: install demo test lint typecheck pytest bench clean system-deps

install: $(BIN)/dbops system-deps

$(BIN)/dbops: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/dbops

# Debian packages the sandbox and the tests need. Installed only when missing, and only as root.
system-deps:
	@missing=""; \
	[ -x $(PG_BIN)/initdb ] || missing="$$missing postgresql-15"; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	[ -x /usr/bin/check_postgres ] || missing="$$missing check-postgres"; \
	[ -x /usr/bin/prometheus-alertmanager ] || missing="$$missing prometheus-alertmanager"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    (apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing)) >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (run as root: apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

demo: install
	$(BIN)/dbops demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

bench: install
	$(BIN)/python bench/events.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/escalation.py
	$(BIN)/python bench/ack.py
	$(BIN)/python bench/worker_idle.py
	$(BIN)/python bench/backups.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
