#!/usr/bin/env bash
# Set up .venv, then SIGKILL a 2-rank ensemble forecast and a 2-rank training run part-way,
# resume them, and check that each equals an uninterrupted run bit for bit.
# Arguments go to scripts/demo.py (--help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
exec "$ROOT/.venv/bin/python" scripts/demo.py "$@"
