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

# Quiet: `make demo`'s first screen is the demo. pip still prints its errors.
$(BIN)/dbops: pyproject.toml
	@echo "Installing dbops and its tools into $(VENV) (the first time takes a minute) ..."
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -qq --upgrade pip
	@$(BIN)/pip install -qq -e '.[dev]'
	@touch $(BIN)/dbops

# Debian packages the sandbox and the tests need. Installed only when missing, and only as root.
# pgbouncer goes in on its own: the sandbox runs one per server, so the package's system service
# must not run. A policy-rc.d (when the machine has none) keeps the install from starting it,
# and it is disabled for boot, with systemd or without.
system-deps:
	@missing=""; \
	[ -x $(PG_BIN)/initdb ] || missing="$$missing postgresql-15"; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	[ -x /usr/bin/check_postgres ] || missing="$$missing check-postgres"; \
	[ -x /usr/bin/prometheus-alertmanager ] || missing="$$missing prometheus-alertmanager"; \
	[ -x /usr/sbin/pgbouncer ] || missing="$$missing pgbouncer"; \
	[ -x /usr/bin/faketime ] || missing="$$missing faketime"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "missing Debian packages:$$missing (run as root: apt-get install$$missing)"; exit 1; \
	fi; \
	echo "installing:$$missing"; \
	apt_install() { (apt-get install -y -q "$$@" || (apt-get update -q && apt-get install -y -q "$$@")) >/dev/null; }; \
	others="$$(echo $$missing | tr ' ' '\n' | grep -vx pgbouncer | tr '\n' ' ')"; \
	if [ -n "$${others// }" ]; then apt_install $$others || exit 1; fi; \
	case " $$missing " in *" pgbouncer "*) \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    trap 'rm -f /usr/sbin/policy-rc.d' EXIT; \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d; \
	  fi; \
	  apt_install pgbouncer || exit 1; \
	  if [ -d /run/systemd/system ]; then \
	    systemctl disable --now -q pgbouncer; \
	  else \
	    service pgbouncer stop >/dev/null 2>&1; update-rc.d pgbouncer disable >/dev/null; \
	  fi && echo "pgbouncer: its system service is stopped and disabled (the sandbox runs its own)" \
	  || echo "pgbouncer: could not disable its system service; stop and disable it by hand";; \
	esac

demo: install
	@$(BIN)/dbops demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

# make test-later: the whole suite a year ahead (not part of `make test`). libfaketime moves the
# clock of every process the suite starts: Python, the sandbox's PostgreSQL clusters, sshds and
# pgBouncers, and a PostgreSQL cluster of the suite's own (TEST_PG_THROWAWAY: the machine's server
# on :5432 runs on the real clock). Monotonic clocks stay real, so timeouts keep their length;
# tests/faketime_site works around libfaketime 0.9.10's time.sleep bug in every Python process.
# Go programs (prometheus-alertmanager) read the clock without libc and stay on the real one.
FAKETIME_LIB = $(firstword $(wildcard /usr/lib/*/faketime/libfaketime.so.1))
.PHONY: test-later
test-later: install
	@test -n "$(FAKETIME_LIB)" || { echo "libfaketime is missing (run as root: make system-deps)"; exit 1; }
	FAKETIME='+365d' FAKETIME_DONT_FAKE_MONOTONIC=1 TEST_PG_THROWAWAY=1 \
	  PYTHONPATH=$(CURDIR)/tests/faketime_site$${PYTHONPATH:+:$$PYTHONPATH} LD_PRELOAD=$(FAKETIME_LIB) $(BIN)/pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/events.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/escalation.py
	$(BIN)/python bench/ack.py
	$(BIN)/python bench/worker_idle.py
	$(BIN)/python bench/backups.py
	$(BIN)/python bench/faults.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
