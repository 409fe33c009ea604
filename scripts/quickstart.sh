#!/usr/bin/env bash
# Install repa into ./.venv and train the embedded default: a tiny SiT + REPA on Fashion-MNIST (CPU, ~10 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/repa train configs/tiny.yaml "$@"
