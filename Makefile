# Two commands on a fresh machine: `make demo` and `make test`.
# Everything installs into ./.venv; nothing is installed globally except
# Debian's pgbouncer, which the pooler tests need (see scripts/services.sh).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help venv owui-venv lint test e2e demo demo-core bench-sql bench-keys services clean

help:
	@echo "make demo        Open WebUI with owui-crypto on a throw-away local stack: the API's chat beside the sealed row"
	@echo "make demo-core   the SQL core and the adapter alone (no Open WebUI; quick)"
	@echo "make test        install into .venv, run ruff and mypy, then the test suite on real PostgreSQL"
	@echo "make e2e         the real Open WebUI 0.12.4 (in .venv-owui) behind owui-crypto serve, end to end"
	@echo "make bench-sql   SQL Fernet vs Python cryptography, as throughput ratios"
	@echo "make bench-keys  KMS calls and begin-hook overhead for 1,000 transactions"

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

services:
	bash scripts/services.sh

# ruff and mypy first: seconds, and a style or type slip fails before the 2-minute suite.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: venv services lint
	$(PY) -m pytest

# Open WebUI lives in its own venv (~3 GB, torch CPU wheel first); this
# project is installed into it editable, with moto (KMS) and pytest.
OWUI_VENV := .venv-owui

owui-venv:
	bash scripts/owui_env.sh
	$(OWUI_VENV)/bin/pip install --quiet -e . 'moto[server]' pytest httpx

e2e: owui-venv services
	$(OWUI_VENV)/bin/python -m pytest e2e -q

demo: owui-venv services
	$(OWUI_VENV)/bin/python scripts/demo.py

demo-core: venv services
	$(PY) scripts/demo_core.py

bench-sql: venv services
	$(PY) scripts/bench_sql.py

bench-keys: venv services
	$(PY) scripts/bench_keys.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
