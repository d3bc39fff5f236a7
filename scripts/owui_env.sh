#!/usr/bin/env bash
# Create (or reuse) a virtualenv holding Open WebUI 0.12.4 for owui-crypto's
# integration work: schema dumps, end-to-end tests against a real OWUI.
#
#   scripts/owui_env.sh            # venv in .venv-owui (relative to repo root)
#   OWUI_VENV=/some/dir scripts/owui_env.sh
#   OWUI_PYTHON=python3.11 scripts/owui_env.sh
#
# torch is installed FIRST and pinned, so pip takes the CPU wheel that pip's
# find-links already provide instead of pulling ~3 GB of CUDA wheels as a
# dependency of open-webui. Idempotent: a stamp file records what was
# installed; when it matches, the script returns at once.
set -euo pipefail

OWUI_VERSION="0.12.4"
TORCH_VERSION="2.13.0"
STAMP_CONTENT="open-webui==${OWUI_VERSION} torch==${TORCH_VERSION} psycopg[binary]"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${OWUI_VENV:-.venv-owui}"
PYTHON="${OWUI_PYTHON:-python3.11}"
STAMP="${VENV}/.owui-crypto-stamp"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_CONTENT" && -x "${VENV}/bin/python" ]]; then
    echo "owui_env: ${VENV} up to date (${STAMP_CONTENT})"
    exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "owui_env: ${PYTHON} not found (set OWUI_PYTHON to a Python 3.11 interpreter)" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "owui_env: ${PYTHON} is not Python 3.11 ($("$PYTHON" -V 2>&1))" >&2
    exit 1
fi

start=$SECONDS
if [[ ! -x "${VENV}/bin/python" ]]; then
    echo "owui_env: creating venv ${VENV} with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
# pip warns once per package about missing local index directories on some
# machines ("Location ... is ignored"); that noise hides real errors.
pip_install() {
    "${VENV}/bin/python" -m pip --quiet install "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

echo "owui_env: upgrading pip"
pip_install --upgrade pip
echo "owui_env: installing torch==${TORCH_VERSION} (CPU wheel, before open-webui)"
pip_install "torch==${TORCH_VERSION}"
echo "owui_env: installing open-webui==${OWUI_VERSION} and psycopg[binary]"
pip_install "torch==${TORCH_VERSION}" "open-webui==${OWUI_VERSION}" "psycopg[binary]"

if "${VENV}/bin/python" -c 'import torch, sys; sys.exit("+cu" in torch.__version__)'; then :; else
    echo "owui_env: warning: torch in ${VENV} is a CUDA build" >&2
fi
printf '%s' "$STAMP_CONTENT" > "$STAMP"
echo "owui_env: done in $((SECONDS - start)) s ($(du -sh "$VENV" 2>/dev/null | cut -f1))"
