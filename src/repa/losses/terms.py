"""REPA's own terms (REPA Sec. 3.3): the denoising loss, token-grid resampling, the alignment loss (negative cosine
or NT-Xent, in fp32) and iREPA's spatial normalisation of the targets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

AlignKind = Literal["cos", "ntxent"]


def denoising_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error over all non-batch dims, computed in (at least) fp32.

    Args:
        pred: (B, C, H, W) prediction (any float dtype, e.g. bf16 under autocast).
        target: same shape.

    Returns:
        (B,) losses.
    """
    diff = pred.float() - target.float() if pred.dtype != torch.float64 else pred - target
    return (diff**2).mean(dim=tuple(range(1, diff.ndim)))


def _square_grid(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what} has {n} tokens, not a square grid; pass its grid (h, w) explicitly")
    return side, side


def resample_tokens(
    tokens_BND: Tensor,
    grid_hw: tuple[int, int] | int,
    *,
    src_grid_hw: tuple[int, int] | None = None,
    mode: Literal["bilinear", "area"] = "bilinear",
) -> Tensor:
    """Resample a row-major token grid to another grid size (e.g. encoder 16x16 -> model 8x8).

    Bilinear (align_corners=False) interpolation on the (h, w) grid, anti-aliased when shrinking; "area"
    averages. Tokens are resampled as raw features (alignment normalises afterwards). Identity when the
    grids already match.

    Args:
        tokens_BND: (B, N, D) tokens, row-major over a (h, w) grid.
        grid_hw: target grid (h', w') or its side for a square grid.
        src_grid_hw: the source grid; None = square grid (N must be a perfect square).
        mode: "bilinear" or "area".

    Returns:
        (B, h' w', D) tokens in the input dtype.

    Raises:
        ValueError: the source grid is unknown (N not square) or does not hold N tokens.
    """
    b, n, d = tokens_BND.shape
    gh, gw = (grid_hw, grid_hw) if isinstance(grid_hw, int) else tuple(grid_hw)
    h, w = _square_grid(n, "the token sequence") if src_grid_hw is None else tuple(src_grid_hw)
    if h * w != n:
        raise ValueError(f"source grid {h}x{w} does not hold {n} tokens")
    if (h, w) == (gh, gw):
        return tokens_BND
    grid = tokens_BND.float().transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)
    if mode == "area":
        out = F.interpolate(grid, size=(gh, gw), mode="area")
    elif mode == "bilinear":
        shrink = gh < h or gw < w
        out = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False, antialias=shrink)
    else:
        raise ValueError(f"unknown resampling mode {mode!r}; choose 'bilinear' or 'area'")
    return out.flatten(2).transpose(1, 2).to(tokens_BND.dtype)  # (B, h' w', D)


def _fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def alignment_per_sample(
    pred_BND: Tensor,
    target_BMD: Tensor,
    kind: AlignKind = "cos",
    temperature: float = 0.1,
    *,
    resample: bool = True,
    pred_grid_hw: tuple[int, int] | None = None,
    target_grid_hw: tuple[int, int] | None = None,
) -> Tensor:
    """Alignment loss of one encoder, per sample, in fp32 with autocast disabled. See `alignment_loss`.

    Returns:
        (B,) losses.
    """
    if pred_BND.ndim != 3 or target_BMD.ndim != 3:
        raise ValueError(f"expected (B, N, D) tokens, got {tuple(pred_BND.shape)} and {tuple(target_BMD.shape)}")
    if pred_BND.shape[0] != target_BMD.shape[0] or pred_BND.shape[2] != target_BMD.shape[2]:
        raise ValueError(
            f"projector output {tuple(pred_BND.shape)} and target {tuple(target_BMD.shape)} differ in batch or "
            "feature dimension (the projector's output width must equal the encoder's embed_dim)"
        )
    with torch.autocast(device_type=pred_BND.device.type, enabled=False):
        pred, target = _fp32(pred_BND), _fp32(target_BMD)  # fp16 norms overflow/underflow -> NaN
        n, m = pred.shape[1], target.shape[1]
        if n != m or (target_grid_hw is not None and pred_grid_hw is not None and target_grid_hw != pred_grid_hw):
            if not resample:
                raise ValueError(
                    f"model has {n} tokens but the encoder gives {m}; enable resampling or match the grids "
                    "(e.g. choose the encoder resolution so its patch grid equals the model's)"
                )
            grid = pred_grid_hw if pred_grid_hw is not None else _square_grid(n, "the model")
            target = resample_tokens(target, grid, src_grid_hw=target_grid_hw)
        pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
        if kind == "cos":  # L_REPA (Sec. 3.3): -(1/N) sum_n cos(y*[n], h_phi(h_t[n]))
            return -(pred * target).sum(dim=-1).mean(dim=-1)
        if kind == "ntxent":
            b, n, _ = pred.shape
            logits = pred @ target.transpose(1, 2) / temperature  # (B, N, N): token n vs target tokens of its image
            labels = torch.arange(n, device=pred.device).repeat(b)
            ce = F.cross_entropy(logits.reshape(b * n, n), labels, reduction="none")
            return ce.reshape(b, n).mean(dim=-1)
        raise ValueError(f"unknown alignment kind {kind!r}; choose 'cos' or 'ntxent'")


def alignment_loss(
    preds: Sequence[Tensor],
    targets: Sequence[Tensor],
    kind: AlignKind = "cos",
    temperature: float = 0.1,
    *,
    resample: bool = True,
) -> Tensor:
    """REPA's alignment loss averaged over encoders, samples and patches, computed in fp32.

    - "cos" (L_REPA, REPA Sec. 3.3): mean of -cos(proj(h_t)[n], y*[n]); -1 for perfectly aligned features,
      equal to the official `proj_loss` (sum over encoders and samples divided by their count).
    - "ntxent": InfoNCE over the tokens of each image: predicted token n must pick target token n among the
      N target tokens of the same image (the others are negatives), logits = cos / temperature; mean over
      tokens, samples and encoders. >= 0, log(N) at chance.

    Inputs of any float dtype are cast to fp32 first (the official fp16 path gives NaN); autocast is disabled
    inside. When the model and encoder grids differ, the TARGETS are resampled to the model grid (square
    grids), or a ValueError is raised with `resample=False`.

    Args:
        preds: per encoder, projector outputs (B, N, D_k).
        targets: per encoder, encoder tokens (B, M, D_k).
        kind: "cos" or "ntxent".
        temperature: NT-Xent temperature.
        resample: allow resampling target grids.

    Returns:
        a 0-d fp32 tensor.
    """
    if len(preds) != len(targets) or len(preds) == 0:
        raise ValueError(f"got {len(preds)} projector outputs for {len(targets)} encoder targets")
    terms = [alignment_per_sample(p, t, kind, temperature, resample=resample) for p, t in zip(preds, targets)]
    return torch.stack([term.mean() for term in terms]).mean()


def spatial_norm(tokens_BND: Tensor, gamma: float = 0.6, eps: float = 1e-6) -> Tensor:
    """iREPA's spatial normalisation of target tokens (Singh et al. 2025, arXiv 2512.10794; official `spatial_zscore`).

    y = (x - gamma * mean_n x) / (std_n x + eps): the mean and the (unbiased, torch's default) standard deviation
    are taken over the N spatial positions of each image, per channel. gamma < 1 keeps part of the shared
    (global) component; gamma = 1 is a plain z-score. Computed in fp32 with autocast off.

    Args:
        tokens_BND: (B, N, D) target tokens, N >= 2.
        gamma: coefficient on the spatial mean (0.6: the official latent-diffusion default, `--zscore-alpha`).
        eps: added to the standard deviation.

    Returns:
        (B, N, D) fp32 (fp64 stays fp64).
    """
    if tokens_BND.ndim != 3 or tokens_BND.shape[1] < 2:
        raise ValueError(f"spatial_norm needs (B, N, D) tokens with N >= 2, got {tuple(tokens_BND.shape)}")
    with torch.autocast(device_type=tokens_BND.device.type, enabled=False):
        x = _fp32(tokens_BND)
        return (x - gamma * x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + eps)
