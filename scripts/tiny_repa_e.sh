#!/usr/bin/env bash
# REPA-E on the embedded default (CPU, <= 15 min on 2 cores): a small VAE trained on Fashion-MNIST by
# `repa train-vae` (once, ~3.5 min), then the SiT and that VAE trained end to end (configs/tiny-repa-e.yaml).
# VAE=DIR picks another VAE folder; extra arguments go to `repa train` (e.g. train.end_to_end=false: plain REPA in
# the frozen VAE's latent space).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/repa ] || bash scripts/install.sh
VAE="${VAE:-runs/vae-fmnist}"
if [ ! -d "$VAE" ]; then
  .venv/bin/repa train-vae configs/tiny-repa-e.yaml "$VAE" data.vae=random:tiny --steps 1000 --batch-size 32
fi
.venv/bin/repa train configs/tiny-repa-e.yaml data.vae="$VAE" "$@"
