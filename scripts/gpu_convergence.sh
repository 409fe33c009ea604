#!/usr/bin/env bash
# The one prepared GPU run of the convergence benchmark (benchmarks/CONVERGENCE.md, "GPU: offline bundle").
#
# It builds nothing and downloads nothing: it runs `python -m benchmarks.convergence --from-bundle` on the bundle that
# travels with the working tree (bundles/<preset>, ignored by git: name it in the device call's `carry`), with the
# FID deferred, and copies into $OUT what the device machine returns: log.txt, deferred.json and one
# samples-<arm>-seed<s>.npz per run (6 files for the gpu preset, < 16 MiB each). Score them afterwards on a CPU:
#   python -m benchmarks.convergence --score-samples <returned folder> --from-bundle bundles/gpu --out <report>
#
# On the device (one call, timeout_s 600, carry ["bundles/gpu"]):
#   bash scripts/gpu_convergence.sh
# Dry run on a CPU (smoke preset, the venv's python, diffusers hidden as on the device):
#   DRY_RUN=1 OUT=/tmp/gpu-dry bash scripts/gpu_convergence.sh
#
# Environment: PRESET (gpu; dry run: smoke), BUNDLE (bundles/$PRESET), OUT (the device sets it; required), WORK
# (/tmp/gpu-convergence: the run folder), LIMIT_S (the run's own time limit, 520 s: it is then interrupted, packs
# what finished and still returns it), PYTHON (python3; dry run: .venv/bin/python), EXTRA (more options, e.g.
# "--steps 3000 --eval-every 500" if a first run shows the preset does not fit).
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
  PRESET=${PRESET:-smoke}
  PYTHON=${PYTHON:-.venv/bin/python}
else
  PRESET=${PRESET:-gpu}
  PYTHON=${PYTHON:-python3}
fi
BUNDLE=${BUNDLE:-bundles/$PRESET}
: "${OUT:?set OUT to the folder whose files come back (the device sets it)}"
WORK=${WORK:-/tmp/gpu-convergence}
LIMIT_S=${LIMIT_S:-520}
EXTRA=${EXTRA:-}

mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export REPA_CACHE="$WORK/outside-cache"  # must stay empty: everything comes from the bundle
export MPLCONFIGDIR="$WORK/matplotlib"
if [ "$DRY_RUN" = 1 ]; then  # the device has no diffusers: make sure nothing imports it
  mkdir -p "$WORK/no-diffusers/diffusers"
  echo 'raise ImportError("diffusers is not installed on the device machine")' >"$WORK/no-diffusers/diffusers/__init__.py"
  export PYTHONPATH="$WORK/no-diffusers:$PYTHONPATH"
fi

{
  echo "== $(date -u +%FT%TZ) gpu_convergence.sh: preset $PRESET, bundle $BUNDLE, limit ${LIMIT_S}s, extra '$EXTRA'"
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" -c 'import sys, torch, repa; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "repa", repa.__file__)'
  du -sh "$BUNDLE" 2>/dev/null
} 2>&1 | tee -a "$LOG"

start=$(date +%s)
# shellcheck disable=SC2086  # EXTRA is a list of options
timeout -s INT -k 30 "$LIMIT_S" "$PYTHON" -m benchmarks.convergence --preset "$PRESET" --from-bundle "$BUNDLE" \
  --out "$WORK/run" $EXTRA 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "== run exit $rc after $(($(date +%s) - start)) s (124/130: stopped at the ${LIMIT_S}s limit; finished evaluations are packed)" | tee -a "$LOG"

cp "$WORK/run/deferred/"* "$OUT/" 2>>"$LOG" || echo "nothing packed" | tee -a "$LOG"
if [ -n "$(ls -A "$REPA_CACHE" 2>/dev/null)" ]; then
  echo "WARNING: something wrote to the outside repa cache $REPA_CACHE:" | tee -a "$LOG"
  ls -R "$REPA_CACHE" | head -20 | tee -a "$LOG"
fi
for f in "$WORK"/run/runs/*/metrics.jsonl; do  # each run's last logged training record (images/s, peak memory)
  [ -f "$f" ] && echo "$(basename "$(dirname "$f")"): $(tail -1 "$f" | cut -c1-300)" | tee -a "$LOG"
done
ls -la "$OUT" | tee -a "$LOG"
exit "$rc"
