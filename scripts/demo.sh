#!/usr/bin/env bash
# Set up .venv, then kill a 2-rank training run part-way, resume it, and check that the
# result equals an uninterrupted run bit for bit. Arguments go to scripts/demo.py (--help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
exec "$ROOT/.venv/bin/python" scripts/demo.py "$@"
