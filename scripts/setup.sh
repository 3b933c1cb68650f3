#!/usr/bin/env bash
# Set up lrc for development: a virtual environment in .venv with lrc installed editable, plus the test extras.
#
#     bash scripts/setup.sh            # from any directory; safe to run again (it only fills in what is missing)
#
# Needs python3 >= 3.10 and access to a package index (pip); nothing else is downloaded. Non-interactive: works
# with CI=true and no stdin.
#
# Environment:
#   LRC_TORCH_SPEC   the torch requirement to install first (default "torch==2.13.0"); for example
#                    LRC_TORCH_SPEC="torch==2.5.1" (any requirement pip understands, options included) on a CUDA machine.
#   PYTHON           the interpreter that creates the venv (default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" --quiet --disable-pip-version-check --no-input)

# A newer pip is nice to have, not needed: an offline or pinned index must not stop the setup.
"${PIP[@]}" install --upgrade pip </dev/null || echo "setup: could not upgrade pip; going on with $("$VENV/bin/pip" --version)"

# torch first, pinned. lrc only asks for torch>=2.6, and an unpinned resolve takes the newest torch from PyPI:
# on Linux that is the CUDA build, several GB of wheels. The development machines and CI keep the CPU wheel of
# torch 2.13.0 on disk (pip's find-links), which this pin selects; a CUDA machine sets LRC_TORCH_SPEC instead.
# Word splitting of the spec is intended, so it can carry pip options such as --index-url.
# shellcheck disable=SC2086
"${PIP[@]}" install ${LRC_TORCH_SPEC:-torch==2.13.0} </dev/null

# lrc itself, editable, with the test extras; the torch installed above already satisfies its requirement.
"${PIP[@]}" install -e '.[test]' </dev/null

echo "setup: ready — $("$VENV/bin/python" -c 'import torch, compressor; print(f"lrc {compressor.__version__}, torch {torch.__version__}")')"
