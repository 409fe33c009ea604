"""`load_vae`: a VAE from its spec string (`data.vae`, `repa prepare --vae`): a hub id or diffusers folder, a random
layout (`random[:preset|{json}]`), or a REPA-E checkpoint's tuned VAE. It sits above `repa.data.vae` and
`repa.data.tuned_vae` (the tuned VAE builds on the plain one), so neither imports the other in a cycle."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from repa.data.tuned_vae import load_tuned_vae
from repa.data.vae import RANDOM_VAE_PRESETS, VAE


def load_vae(spec: str, device: str | torch.device = "cpu") -> VAE:
    """A `VAE` from a hub id / local folder, or `random[:preset|{json}]` (random init, seed 0).

    Args:
        spec: "stabilityai/sd-vae-ft-ema", a `save_pretrained` folder, "random:small", 'random:{"layers_per_block": 1}',
            or a REPA-E checkpoint's `vae.safetensors` (the tuned VAE, normalising with its latent BatchNorm).
        device: target device.

    Returns:
        the frozen VAE wrapper.
    """
    if spec == "random" or spec.startswith("random:"):
        what = spec.partition(":")[2] or "tiny"
        if what.startswith("{"):
            overrides = json.loads(what)
        elif what in RANDOM_VAE_PRESETS:
            overrides = RANDOM_VAE_PRESETS[what]
        else:
            raise ValueError(f"VAE {spec!r}: unknown preset {what!r}; use one of {sorted(RANDOM_VAE_PRESETS)} or JSON")
        vae = VAE.from_config(seed=0, **overrides)
        vae.source = f"random:{what}"
        return vae.to(device)
    if spec.endswith(".safetensors") and Path(spec).is_file():  # REPA-E: a checkpoint's tuned VAE + its BatchNorm
        return load_tuned_vae(spec, device)
    return VAE.from_pretrained(spec, device=device)
