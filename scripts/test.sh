#!/usr/bin/env bash
# Install repa with its test dependencies into ./.venv and run the whole test suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
REPA_EXTRAS=dev bash scripts/install.sh
.venv/bin/python -m ruff check src tests benchmarks scripts
.venv/bin/python -m ruff format --check src tests benchmarks scripts
.venv/bin/python -m pytest -q -ra "$@"
