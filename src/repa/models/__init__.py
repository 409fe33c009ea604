"""SiT/DiT backbones with REPA projectors, the `MODELS` registry keyed by paper names, and `build_model`."""

from __future__ import annotations

import difflib
from typing import Any

from repa.models.dit import DiffusionTransformer
from repa.models.flops import count_params, forward_flops, forward_macs

__all__ = ["MODELS", "SIZES", "DiffusionTransformer", "build_model", "count_params", "forward_flops", "forward_macs"]

# (hidden_size, depth, num_heads, default align_depth). S/B/L/XL are DiT's sizes (Table 1 of DiT). The align
# depths of B (4) and L/XL (8) are REPA's (Sec. 4); S (12 blocks like B) takes B's 4; the tiny T (DeiT-Ti
# width, 6 blocks, 64-channel heads like every other size) takes 2, about a third of the depth like the rest.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "T": (192, 6, 3, 2),
    "S": (384, 12, 6, 4),
    "B": (768, 12, 12, 4),
    "L": (1024, 24, 16, 8),
    "XL": (1152, 28, 16, 8),
}
PATCH_SIZES = (1, 2, 4, 8)


def _registry() -> dict[str, dict[str, Any]]:
    """Constructor kwargs per name; input defaults are ImageNet 256 SD-VAE latents (4 x 32 x 32, 1000 classes)."""
    models: dict[str, dict[str, Any]] = {}
    for family, learn_sigma in (("SiT", False), ("DiT", True)):
        for size, (hidden, depth, heads, align) in SIZES.items():
            for patch in PATCH_SIZES:
                models[f"{family}-{size}/{patch}"] = dict(
                    input_size=32, patch_size=patch, in_channels=4, hidden_size=hidden, depth=depth,
                    num_heads=heads, num_classes=1000, learn_sigma=learn_sigma, align_depth=align,
                )  # fmt: skip
    return models


# Paper name -> `DiffusionTransformer` kwargs. SiT predicts velocity (C outputs); DiT predicts eps and the
# variance interpolation (learn_sigma, 2C outputs). Projectors exist iff `encoder_dims` is given.
MODELS: dict[str, dict[str, Any]] = _registry()


def build_model(name: str, **overrides: Any) -> DiffusionTransformer:
    """Build a registered model, with any constructor argument overridden.

    Args:
        name: a key of `MODELS`, e.g. "SiT-XL/2", "DiT-B/4", "SiT-T/4".
        **overrides: `DiffusionTransformer` arguments replacing the registry's (input_size, in_channels,
            num_classes, encoder_dims, align_depth, hidden_size, ...).

    Returns:
        the model (official init, train mode, on the default device; build under `torch.device("meta")`
        to size a model without allocating it).

    Raises:
        ValueError: unknown name (the message lists the closest and all valid names) or bad arguments.
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(MODELS)}")
    return DiffusionTransformer(**{**MODELS[name], **overrides})
