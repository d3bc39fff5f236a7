#!/usr/bin/env bash
# Create (or reuse) a virtualenv holding Open WebUI 0.12.4 and this project,
# for owui-crypto's integration work: make demo, make e2e, schema dumps.
#
#   scripts/owui_env.sh            # venv in .venv-owui (relative to repo root)
#   scripts/owui_env.sh --browser  # also Debian's chromium + chromium-driver (make demo-screenshot)
#   OWUI_VENV=/some/dir scripts/owui_env.sh
#   OWUI_PYTHON=python3.11 scripts/owui_env.sh
#
# Two stages, each with its own stamp, so a second run installs nothing:
#   1. Open WebUI (~3 GB): keyed on this script's content. torch is installed
#      FIRST and pinned, so pip takes the CPU wheel that pip's find-links
#      already provide instead of pulling ~3 GB of CUDA wheels as a
#      dependency of open-webui.
#   2. this project, editable, with the tools the demo and e2e use: keyed on
#      pyproject.toml (and on stage 1), since an editable install only needs
#      redoing when the project's metadata (dependencies, entry points) changes.
set -euo pipefail

OWUI_VERSION="0.12.4"
TORCH_VERSION="2.13.0"
# moto: KMS emulated over HTTP; pytest, httpx: make e2e; selenium: the browser
# tests and make demo-screenshot (it drives Debian's chromium, never downloads one).
PROJECT_EXTRAS=("moto[server]" pytest httpx "selenium>=4.11,<5")

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${OWUI_VENV:-.venv-owui}"
PYTHON="${OWUI_PYTHON:-python3.11}"
OWUI_STAMP="${VENV}/.owui-crypto-stamp"
PROJECT_STAMP="${VENV}/.owui-crypto-project-stamp"
WITH_BROWSER=0
for arg in "$@"; do
    case "$arg" in
        --browser) WITH_BROWSER=1 ;;
        *) echo "owui_env: unknown argument $arg (usage: $0 [--browser])" >&2; exit 2 ;;
    esac
done

digest() { sha256sum "$@" | cut -c1-16 | tr '\n' ' '; }
OWUI_KEY="open-webui==${OWUI_VERSION} torch==${TORCH_VERSION} script $(digest "${BASH_SOURCE[0]}")"
PROJECT_KEY="${OWUI_KEY}| pyproject $(digest pyproject.toml)"

# pip warns once per package about missing local index directories on some
# machines ("Location ... is ignored"); that noise hides real errors. Only
# stderr is filtered: stdout stays pip's own, so its progress bars still draw.
pip_install() {
    "${VENV}/bin/python" -m pip install "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

start=$SECONDS
if [[ -f "$OWUI_STAMP" && "$(cat "$OWUI_STAMP")" == "$OWUI_KEY" && -x "${VENV}/bin/python" ]]; then
    owui_done=1
else
    owui_done=0
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "owui_env: ${PYTHON} not found (set OWUI_PYTHON to a Python 3.11 interpreter)" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        echo "owui_env: ${PYTHON} is not Python 3.11 ($("$PYTHON" -V 2>&1))" >&2
        exit 1
    fi
    # An update of an existing venv mostly finds everything satisfied: pip's
    # one line per package (~250) would bury what changed, so it runs quiet.
    verbosity=()
    if [[ -x "${VENV}/bin/python" ]]; then
        echo "owui_env: ${VENV} was made by another version of this script: updating it"
        echo "          (pip keeps what is already installed: 10 to 30 s)"
        verbosity=(--quiet)
    else
        echo "owui_env: first run: installing Open WebUI ${OWUI_VERSION} into ${VENV}"
        echo "          about 3 GB on disk from 800 MB of wheels, 3 to 5 minutes; later runs skip this"
        echo "owui_env: creating venv ${VENV} with $("$PYTHON" -V 2>&1)"
        "$PYTHON" -m venv "$VENV"
    fi
    rm -f "$OWUI_STAMP" "$PROJECT_STAMP"
    echo "owui_env: step 1/4: upgrading pip"
    pip_install --quiet --upgrade pip
    echo "owui_env: step 2/4: torch ${TORCH_VERSION}, CPU build (190 MB download, 750 MB installed),"
    echo "          first, so that open-webui does not pull torch's CUDA build (3 GB more)"
    pip_install "${verbosity[@]}" "torch==${TORCH_VERSION}"
    echo "owui_env: step 3/4: open-webui ${OWUI_VERSION} and psycopg[binary], with about 240 dependencies"
    echo "          (600 MB of wheels, open-webui's own 106 MB of them; 2.1 GB installed)"
    pip_install "${verbosity[@]}" "torch==${TORCH_VERSION}" "open-webui==${OWUI_VERSION}" "psycopg[binary]"
    if ! "${VENV}/bin/python" -c 'import torch, sys; sys.exit("+cu" in torch.__version__)'; then
        echo "owui_env: warning: torch in ${VENV} is a CUDA build" >&2
    fi
    printf '%s' "$OWUI_KEY" > "$OWUI_STAMP"
fi

if [[ -f "$PROJECT_STAMP" && "$(cat "$PROJECT_STAMP")" == "$PROJECT_KEY" ]]; then
    project_done=1
else
    project_done=0
    echo "owui_env: step 4/4: this project (editable) and ${PROJECT_EXTRAS[*]} into ${VENV}"
    # setuptools warns on every editable install that a folder named like a
    # package in the working directory may shadow it; that is the point of an
    # editable install here, so the warning is dropped at its source.
    PYTHONWARNINGS="ignore:Editable installation" pip_install --quiet -e . "${PROJECT_EXTRAS[@]}"
    printf '%s' "$PROJECT_KEY" > "$PROJECT_STAMP"
fi

if [[ $WITH_BROWSER == 1 ]] && ! [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    # Debian's packages: the one way to a browser here (browser downloads are not possible).
    if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
        echo "owui_env: installing Debian's chromium and chromium-driver (about 400 MB)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "owui_env: needs Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver" >&2
        exit 1
    fi
fi

if [[ $owui_done == 1 && $project_done == 1 ]]; then
    echo "owui_env: ${VENV} up to date (open-webui ${OWUI_VERSION}, this project; nothing installed)"
else
    echo "owui_env: done in $((SECONDS - start)) s ($(du -sh "$VENV" 2>/dev/null | cut -f1) in ${VENV})"
fi
