"""Rebuild a model from any supported checkpoint (repa, official REPA `last.pt`, bare state dicts)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Official names -> heads (the weights do not encode the head count).
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}


def infer_model_kwargs(state: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """Constructor arguments of `DiffusionTransformer` read off a state dict with official key names.

    Args:
        state: the state dict.
        num_heads: head count when known (from a config or the official `args.model`); otherwise the
            official sizes' value for this width, or width / 64.
    """
    try:
        w = state["x_embedder.proj.weight"]  # (D, C, p, p)
        pos = state["pos_embed"]  # (1, N, D)
        table = state["y_embedder.embedding_table.weight"]  # (num_classes + 1, D)
        final = state["final_layer.linear.weight"]  # (p * p * C_out, D)
    except KeyError as err:
        raise ValueError(f"not a SiT/DiT state dict with official key names: missing {err}") from err
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[-1]
    grid = math.isqrt(pos.shape[1])
    if grid * grid != pos.shape[1]:
        raise ValueError(f"pos_embed has {pos.shape[1]} tokens, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_channels = final.shape[0] // (patch * patch)
    projectors = sorted({int(m.group(1)) for k in state if (m := re.match(r"projectors\.(\d+)\.", k))})
    kwargs: dict[str, Any] = dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads or _HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=table.shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
        encoder_dims=[state[f"projectors.{k}.4.weight"].shape[0] for k in projectors],
        qk_norm=any(k.startswith("blocks.0.attn.q_norm") for k in state),
    )
    if projectors:
        kwargs["projector_dim"] = state["projectors.0.0.weight"].shape[0]
    return kwargs


def load_model_for_inference(
    path: str | Path, prefer_ema: bool = True, num_heads: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load any supported checkpoint (repa folder, official REPA `last.pt`, public SiT/DiT files, safetensors)
    into a `DiffusionTransformer` in eval mode, in REPA's conventions (SiT's time/sign are folded into the
    weights by `repa.convert`).

    Returns:
        (model, info) where info holds the detected format, the repa config (if any) and the step.
    """
    from repa.convert import load_official

    return load_official(path, prefer_ema=prefer_ema, num_heads=num_heads)


@dataclass
class LoadedModel:
    """A checkpoint ready for inference: the model, its run config and where it came from."""

    model: nn.Module
    cfg: Any  # repa.config.Config (defaults for official checkpoints)
    info: dict[str, Any]
    path: Path

    @property
    def is_repa(self) -> bool:
        return "config" in self.info

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        k = self.info["model_kwargs"]
        return (k["in_channels"], k["input_size"], k["input_size"])

    @property
    def num_classes(self) -> int:
        return int(self.info["model_kwargs"]["num_classes"])

    @property
    def run_dir(self) -> Path | None:
        """The run folder of a repa checkpoint (`<run>/checkpoints/step_*`), else None."""
        return self.path.parent.parent if self.is_repa else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder -> its newest checkpoint; a checkpoint folder or file is returned as is."""
    from repa.training.checkpoint import latest_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir() and not (path / "state.json").exists():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"{path} is neither a checkpoint nor a run folder with checkpoints/step_*")
        return found
    return path


def load_model(checkpoint: str | Path, prefer_ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a repa run/checkpoint or an official checkpoint for inference (EMA weights by default)."""
    from repa.config import from_dict

    path = resolve_checkpoint(checkpoint)
    model, info = load_model_for_inference(path, prefer_ema=prefer_ema)
    cfg = from_dict(info["config"]) if "config" in info else from_dict({})
    return LoadedModel(model.to(device).eval(), cfg, info, path)
