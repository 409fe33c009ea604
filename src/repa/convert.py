"""Official checkpoints in REPA's conventions: REPA `last.pt`, the public SiT-XL/2 and DiT-XL/2 state dicts.

All three use the DiT/SiT parameter names that `repa.models.DiffusionTransformer` keeps, so the weights load
strictly; what differs is the meaning of the model's inputs and outputs:

- "repa": official REPA / this project. Flow models: t = 0 data, t = 1 noise, v = d x_t / dt (C outputs).
  DiT-style models trained by repa with `transport.diffusion=ddpm` share DiT's convention below.
- "sit": the public SiT checkpoints (github.com/willisma/SiT). t_sit = 1 - t and v_sit = -v
  (`repa.transport.conventions`); learn_sigma=True gives 2C outputs of which SiT uses the first C only
  (the other C were never trained: their final-layer rows stay at their zero init).
- "dit": the public DiT checkpoints. eps-prediction + learned Sigma (2C outputs), integer DDPM timesteps fed
  as floats 0 .. 999, which is exactly `repa.transport.ddpm`'s convention: no conversion is needed.

A SiT checkpoint is converted either by a wrapper that maps time and sign at every call (`SiTWrapper`, exact),
or once in weight space (`sit_to_repa_state_dict`): the sign is folded into the final layer, and since the
timestep features are [cos(t f_k), sin(t f_k)], those of 1 - t are a fixed linear map (a reflection per
frequency) of those of t, which folds into `t_embedder.mlp.0`. The result is an ordinary REPA-convention SiT
(C outputs) that every sampler, analysis and the training loop take as it is, e.g. for fine-tuning with REPA.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from repa.architecture import _channels, _shape, infer_model_kwargs
from repa.transport.conventions import repa_time_to_sit, sit_velocity_to_repa
from repa.transport.ddpm import create_diffusion

__all__ = [
    "DDPMAnalysisView",
    "Format",
    "SiTWrapper",
    "detect_format",
    "infer_model_kwargs",
    "linear_to_ddpm",
    "repa_to_sit_state_dict",
    "sit_to_repa_state_dict",
    "timestep_reflection",
]

Format = Literal["repa", "sit", "dit"]
FORMATS: tuple[str, ...] = ("repa", "sit", "dit")


def _sigma_rows_zero(state: Mapping[str, Tensor]) -> bool:
    c, c_out, patch = _channels(state)
    w = state["final_layer.linear.weight"].reshape(patch * patch, c_out, -1)[:, c:]
    b = state["final_layer.linear.bias"].reshape(patch * patch, c_out)[:, c:]
    return not bool(w.any()) and not bool(b.any())


def detect_format(state_dict: Mapping[str, Tensor], hints: Mapping[str, Any] | None = None) -> Format:
    """Which convention a state dict follows: "repa", "sit" or "dit".

    In order: `hints["format"]` if given; "repa" when the weights have REPA projectors, come from a repa
    checkpoint (`hints["source"] == "repa"`) or from an official REPA `last.pt` (REPA's `args`: proj_coeff,
    enc_type, encoder_depth), or predict C channels (a velocity without learned Sigma); for 2C outputs, "sit" or
    "dit" in `args["model"]` (official training checkpoints, "SiT-XL/2") or in the file name (`hints["filename"]`,
    e.g. SiT-XL-2-256x256.pt); finally the weights themselves: SiT never trains its Sigma
    rows of the final layer, so all-zero Sigma rows mean "sit", anything else "dit".

    Args:
        state_dict: model weights with official key names.
        hints: optional `format`, `filename`, `source` (the `format` of `load_model_weights`' info), `args`.

    Returns:
        "repa", "sit" or "dit".
    """
    hints = dict(hints or {})
    if hints.get("format"):
        if hints["format"] not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {hints['format']!r}")
        return hints["format"]
    c, c_out, _ = _channels(state_dict)
    args = dict(hints.get("args") or {})
    repa_args = any(k in args for k in ("proj_coeff", "enc_type", "encoder_depth"))  # official REPA train.py
    if any(k.startswith("projectors.") for k in state_dict) or hints.get("source") == "repa" or repa_args or c_out == c:
        return "repa"
    if c_out != 2 * c:
        raise ValueError(f"final layer predicts {c_out} channels for {c} input channels: neither C nor 2C")
    for name in (str(args.get("model") or ""), Path(str(hints.get("filename") or "")).name):  # "SiT-XL/2", files
        tagged = [f for f in ("sit", "dit") if re.search(rf"(?<![a-z]){f}(?![a-z])", name.lower())]
        if len(tagged) == 1:
            return tagged[0]  # type: ignore[return-value]
    return "sit" if _sigma_rows_zero(state_dict) else "dit"


def timestep_reflection(dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """R (dim, dim) float64 with timestep_features(1 - t) = R @ timestep_features(t), and R @ R = I.

    With features [cos(t f_k), sin(t f_k)] (the float32 frequencies of `repa.models.layers.timestep_features`):
    cos((1 - t) f) = cos f cos tf + sin f sin tf and sin((1 - t) f) = sin f cos tf - cos f sin tf.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).double()
    cos, sin, k = torch.cos(freqs), torch.sin(freqs), torch.arange(half)
    r = torch.zeros(dim, dim, dtype=torch.float64)
    r[k, k], r[k, half + k], r[half + k, k], r[half + k, half + k] = cos, sin, sin, -cos
    if dim % 2:
        r[-1, -1] = 1.0  # the zero padding column
    return r


def _reflect_time(state: dict[str, Tensor]) -> None:
    _shape(state, "t_embedder.mlp.0.weight", 2)  # (D, 256): h = W feats(1 - t) = (W R) feats(t)
    w = state["t_embedder.mlp.0.weight"]
    state["t_embedder.mlp.0.weight"] = (w.double() @ timestep_reflection(w.shape[1])).to(w.dtype)


def sit_to_repa_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official SiT weights -> a REPA-convention SiT (C outputs): model(x, t, y) = -sit(x, 1 - t, y)[:, :C].

    Exact up to float rounding (about 1e-6 relative): the Sigma rows are dropped, the velocity rows negated,
    and time reversal is folded into `t_embedder.mlp.0.weight` (see `timestep_reflection`).

    Args:
        state_dict: SiT weights (2C outputs as published, or C).

    Returns:
        a new state dict for `DiffusionTransformer(learn_sigma=False)`.
    """
    state = dict(state_dict)
    c, c_out, patch = _channels(state)
    w, b = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
    # rows are ordered (p, q, channel), channel fastest (see DiffusionTransformer.unpatchify)
    state["final_layer.linear.weight"] = -w.reshape(patch * patch, c_out, -1)[:, :c].reshape(patch * patch * c, -1)
    state["final_layer.linear.bias"] = -b.reshape(patch * patch, c_out)[:, :c].reshape(-1)
    _reflect_time(state)
    return state


def repa_to_sit_state_dict(state_dict: Mapping[str, Tensor], learn_sigma: bool = True) -> dict[str, Tensor]:
    """The inverse of `sit_to_repa_state_dict` (export, tests): SiT layout with zero Sigma rows if `learn_sigma`."""
    state = dict(state_dict)
    c, c_out, patch = _channels(state)
    if c_out != c:
        raise ValueError("expected a REPA-convention velocity model (C outputs)")
    w = -state["final_layer.linear.weight"].reshape(patch * patch, c, -1)
    b = -state["final_layer.linear.bias"].reshape(patch * patch, c)
    if learn_sigma:
        w, b = torch.cat([w, torch.zeros_like(w)], 1), torch.cat([b, torch.zeros_like(b)], 1)
    state["final_layer.linear.weight"], state["final_layer.linear.bias"] = w.reshape(-1, w.shape[-1]), b.reshape(-1)
    _reflect_time(state)  # R is its own inverse
    return state


class SiTWrapper(nn.Module):
    """An official SiT (a DiffusionTransformer holding its weights) seen in REPA's convention, converting per call.

    `forward(x_t, t, y)` returns (v, zs) with t = 0 data and v = -v_sit(x_t, 1 - t)[:, :C], so `repa.samplers`
    (`model_velocity_fn(wrapper)`), `repa.training.setup.generate` and `repa.analysis` take it like a repa model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.in_channels, self.num_classes = model.in_channels, model.num_classes
        self.input_size, self.patch_size, self.depth = model.input_size, model.patch_size, model.depth
        self.learn_sigma = False  # the wrapper outputs the C velocity channels only

    def forward(
        self, x_t: Tensor, t: Tensor, y: Tensor, *, force_drop_ids: Tensor | None = None, project: bool = True
    ) -> tuple[Tensor, list[Tensor]]:
        """(v (B, C, H, W), zs) in REPA's convention; arguments as `DiffusionTransformer.forward`."""
        out, zs = self.model(x_t, repa_time_to_sit(torch.as_tensor(t)), y, force_drop_ids=force_drop_ids,
                             project=project)  # fmt: skip
        return sit_velocity_to_repa(out[:, : self.in_channels]), zs

    def velocity(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The REPA-convention velocity `fn(x_t, t, y)` for `repa.samplers`."""
        return self.forward(x_t, t, y, project=False)[0]

    def forward_hidden(
        self, x_t: Tensor, t: Tensor, y: Tensor, layers: Iterable[int], *, force_drop_ids: Tensor | None = None
    ) -> dict[int, Tensor]:
        """Hidden tokens after `layers` at REPA time t (SiT sees 1 - t)."""
        return self.model.forward_hidden(x_t, repa_time_to_sit(torch.as_tensor(t)), y, layers,
                                         force_drop_ids=force_drop_ids)  # fmt: skip


def linear_to_ddpm(x_t: Tensor, t: Tensor | float, diffusion: Any = None) -> tuple[Tensor, Tensor]:
    """Map a linear-path input x_t = (1 - t) x + t noise to DDPM's variance-preserving one at the same noise ratio.

    x_vp = x_t / sqrt((1 - t)^2 + t^2) = sqrt(abar) x + sqrt(1 - abar) noise with abar = (1 - t)^2 / ((1 - t)^2
    + t^2); the model time is the (fractional) step whose log-SNR matches, interpolated between the 1000 steps
    and clamped to [0, T - 1] (so t near 0 or 1 is clamped to DDPM's range).

    Args:
        x_t: (B, ...) linear-path inputs.
        t: (B,) or scalar REPA time.
        diffusion: a `GaussianDiffusion` (default: DiT's 1000 linear-beta steps).

    Returns:
        (x_vp, t_model (B,) float32).
    """
    diffusion = diffusion or create_diffusion(None)
    t_B = torch.as_tensor(t, dtype=torch.float64, device="cpu").expand(x_t.shape[0]).clamp(1e-6, 1 - 1e-6)
    log_snr = 2 * (torch.log1p(-t_B) - torch.log(t_B))
    ac = diffusion.alphas_cumprod
    steps_log_snr = torch.log(ac) - torch.log1p(-ac)  # decreasing in the step index
    xs, ys = steps_log_snr.flip(0).numpy(), diffusion.timestep_map.double().flip(0).numpy()
    t_model = torch.from_numpy(np.interp(log_snr.numpy(), xs, ys)).float().to(x_t.device)
    scale = torch.sqrt((1 - t_B) ** 2 + t_B**2).to(device=x_t.device, dtype=x_t.dtype)
    return x_t / scale.reshape(-1, *([1] * (x_t.ndim - 1))), t_model


class DDPMAnalysisView(nn.Module):
    """A DDPM model (official DiT, or repa with `transport.diffusion=ddpm`) for `repa.analysis`, which noises inputs
    on the linear path with REPA times: `forward_hidden(x_t, t, y, layers)` maps them with `linear_to_ddpm`.
    Sampling a DiT needs no view: `repa.transport.ddpm` (`ddpm_model_fn(model)`) takes the model itself."""

    def __init__(self, model: nn.Module, diffusion: Any = None) -> None:
        super().__init__()
        self.model, self.diffusion = model, diffusion or create_diffusion(None)
        self.num_classes, self.depth = model.num_classes, model.depth
        self.class_token_dim = getattr(model, "class_token_dim", 0)

    def forward_hidden(
        self, x_t: Tensor, t: Tensor, y: Tensor, layers: Iterable[int], *, force_drop_ids: Tensor | None = None,
        cls_t: Tensor | None = None,
    ) -> dict[int, Tensor]:  # fmt: skip
        """Hidden tokens after `layers` for a linear-path input x_t (and a REG class token cls_t on the same path)
        at REPA time t (see `linear_to_ddpm`)."""
        x_vp, t_model = linear_to_ddpm(x_t, t, self.diffusion)
        extra = {} if cls_t is None else {"cls_t": linear_to_ddpm(cls_t, t, self.diffusion)[0]}
        return self.model.forward_hidden(x_vp, t_model, y, layers, force_drop_ids=force_drop_ids, **extra)
