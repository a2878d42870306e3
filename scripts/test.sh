#!/usr/bin/env bash
# Set up .venv, then run the linters, the type checker and the test suite.
# Extra arguments go to pytest, e.g. `./scripts/test.sh -x -q -k manifest`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

BIN="$ROOT/.venv/bin"
failed=()

step() {
    local name="$1"
    shift
    echo "==> $name"
    if ! "$@"; then
        failed+=("$name")
    fi
}

step "ruff check" "$BIN/ruff" check .
step "ruff format --check" "$BIN/ruff" format --check .
step "mypy" "$BIN/mypy"

echo "==> pytest"
set +e
"$BIN/python" -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "test.sh: warning: pytest collected no tests" >&2
elif [[ $rc -ne 0 ]]; then
    failed+=("pytest (exit $rc)")
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "test.sh: FAILED: $(IFS=,; echo "${failed[*]}" | sed 's/,/, /g')" >&2
    exit 1
fi
