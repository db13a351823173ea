# tunneld: `make demo` runs the walkthrough, `make test` the test suite, `make check` lint + types + tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# Tests mostly wait (for sshd, for a tunnel to come up or notice a loss): 8 workers on 2 cores, and an idle
# worker takes tests queued for a busy one (worksteal). What exists once per machine (the test user's systemd
# manager, /etc/passwd) is taken under a machine-wide lock (tests/harness.py: machine_lock).
PYTEST_WORKERS ?= 8

.PHONY: dev sshd test lint format type check demo bench faults debian13-sshd clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)  ## create the virtualenv and install tunneld with its dev tools

sshd:  ## make sure OpenSSH's sshd exists (installs openssh-server with apt-get when it can)
	@scripts/ensure-sshd

test: dev sshd  ## run the test suite against a real sshd on loopback
	@# The tests start ~2000 Python processes (the CLI, supervisors): compiled once here, not by each one where
	@# PYTHONDONTWRITEBYTECODE is set (a CI default), which costs ~0.05 s CPU per process.
	$(BIN)/python -m compileall -q tunneld tests
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

lint: dev
	$(BIN)/ruff check tunneld tests scripts bench
	$(BIN)/ruff format --check tunneld tests scripts bench

format: dev
	$(BIN)/ruff format tunneld tests scripts bench
	$(BIN)/ruff check --fix tunneld tests scripts bench

type: dev
	$(BIN)/mypy

check: lint type test

bench: dev sshd  ## tunneld against ssh -N -L and sshtunnel: loopback, a 40 ms path, 50 tunnels; writes docs/benchmarks.md (~20 min)
	$(BIN)/python -m pip install -q -e '.[bench]'
	@# Byte-compile as `pip install` does for users: with PYTHONDONTWRITEBYTECODE set, every supervisor
	@# would otherwise compile tunneld from source at each start (+0.05 s CPU and ~1 MiB per process).
	$(BIN)/python -m compileall -q tunneld
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/report.py

faults: dev sshd  ## real faults (restart, freeze, link down, blackhole, key change) in a network namespace; root only; writes docs/reliability.md (~15 min)
	$(BIN)/python bench/faults.py $(FAULTS_ARGS)

debian13-sshd: dev  ## a Debian 13 root with OpenSSH 10's sshd (PerSourcePenalties) for bench/penalties.py and faults; root only, cached in /var/cache/tunneld/debian13
	$(BIN)/python bench/debian13.py

demo: dev sshd  ## start a throwaway sshd + MLflow stand-in and walk through start/status/restart/stop
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
