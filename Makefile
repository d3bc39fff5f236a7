# Two commands on a fresh machine: `make demo` and `make test`.
# Everything installs into ./.venv; nothing is installed globally except
# Debian's pgbouncer, which the pooler tests need (see scripts/services.sh).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help venv owui-venv lint test e2e demo demo-core bench-sql bench-keys services clean

help:
	@echo "make demo        Open WebUI with owui-crypto on a throw-away local stack, until Ctrl-C (DEMO_EXIT=1: print and stop)"
	@echo "make demo-screenshot  the README's picture: the demo chat in headless Chromium beside its sealed rows"
	@echo "make demo-core   the SQL core and the adapter alone (no Open WebUI; quick)"
	@echo "make test        install into .venv, run ruff and mypy, then the test suite on real PostgreSQL"
	@echo "make e2e         the real Open WebUI 0.12.4 (in .venv-owui) behind owui-crypto serve, end to end"
	@echo "make bench-sql   SQL Fernet vs Python cryptography, as throughput ratios"
	@echo "make bench-keys  KMS calls and begin-hook overhead for 1,000 transactions"
	@echo "make bench-owui  plain Open WebUI against owui-crypto serve, side by side (BENCH_OWUI_ARGS=--quick)"
	@echo "make soak        load and faults on two serve instances, then every invariant (SOAK_ARGS=--ci: a few minutes)"

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
# project is installed into it editable, with moto (KMS), pytest, httpx and
# selenium. owui_env.sh keeps stamps (its own content, pyproject.toml), so
# a second run installs nothing and takes well under a second.
OWUI_VENV := .venv-owui

owui-venv:
	@bash scripts/owui_env.sh

e2e: owui-venv services
	$(OWUI_VENV)/bin/python -m pytest e2e -q
	$(OWUI_VENV)/bin/python -m pytest tests/test_aurora.py -q -m owui

# Serves until Ctrl-C, then removes all it started. DEMO_EXIT=1: print, then
# stop and clean up at once (for scripts and CI).
DEMO_EXIT ?=

demo: owui-venv services
	@$(OWUI_VENV)/bin/python scripts/demo.py $(if $(filter-out 0 no false,$(DEMO_EXIT)),--exit)

demo-core: venv services
	$(PY) scripts/demo_core.py

bench-sql: venv services
	$(PY) scripts/bench_sql.py

bench-keys: venv services
	$(PY) scripts/bench_keys.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# The README's picture: `make demo`'s stack, headless Chromium (Debian's) signed in as the demo user with
# the chat open, and the same row through psql; docs/demo-chat.png, docs/demo-sealed-row.png and the two
# side by side in docs/demo-side-by-side.png.
.PHONY: demo-screenshot
demo-screenshot: services
	@bash scripts/owui_env.sh --browser
	@$(OWUI_VENV)/bin/python scripts/demo.py --screenshot docs

# Plain Open WebUI (`open-webui serve`) against `owui-crypto serve`, side by side on two throw-away databases
# with the same data, interleaved requests; table, PNG and samples in bench-results/ (or BENCH_OWUI_ARGS=
# "--out DIR"); ends with one RESULT line. BENCH_OWUI_ARGS=--quick: 20 and 200 chats, a few minutes.
# matplotlib (the PNG) is installed into .venv-owui the first time.
BENCH_OWUI_ARGS ?=

.PHONY: bench-owui
bench-owui: owui-venv services owui-matplotlib
	@$(OWUI_VENV)/bin/python scripts/bench_owui.py $(BENCH_OWUI_ARGS)

# The PNGs of bench-owui and soak: matplotlib goes into .venv-owui the first time one of them runs.
.PHONY: owui-matplotlib
owui-matplotlib: owui-venv
	@$(OWUI_VENV)/bin/python -c 'import matplotlib' 2>/dev/null || { echo "installing matplotlib into $(OWUI_VENV)"; \
	  $(OWUI_VENV)/bin/python -m pip install --quiet matplotlib 2>&1 | grep -v 'is ignored: it is neither a file nor a directory' || true; }

# Load and faults (issue 12): two `owui-crypto serve` instances behind PgBouncer on a private PostgreSQL 15 cluster,
# Redis, moto's KMS behind a fault proxy; simulated users, faults on a schedule, then every invariant. Results in
# soak-results/ (SOAK_ARGS="--out DIR" elsewhere); ends with `SOAK PASSED ...` or `SOAK FAILED: ...`.
# SOAK_ARGS=--ci: 10 users, 4 minutes of load.
SOAK_ARGS ?=

.PHONY: soak
soak: owui-venv services owui-matplotlib
	@$(OWUI_VENV)/bin/python scripts/soak.py $(SOAK_ARGS)
