"""iREPA's spatial-structure scores of a token grid (Singh et al. 2025, arXiv 2512.10794; official `spatial_metrics.py`).

iREPA finds that a target's spatial structure, not its global (linear-probe) accuracy, predicts how much it helps
generation. Its headline score is LDS, local-vs-distant similarity: how much more alike neighbouring patch tokens are
than distant ones. CDS (correlation-decay slope) and RMSC (RMS spatial contrast) are its companions. Each takes the
tokens of any encoder or model layer, (num_images, T, D) on a row-major (h, w) grid, and returns the mean over
images as a float. The mask-based SRSS needs foreground masks and is not provided.

    lds(encoder(images), encoder.token_grid)
    lds(model.forward_hidden(x_t, t, y, [8])[8], (model.grid_size, model.grid_size))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cds", "lds", "manhattan_distances", "rmsc", "spatial_metrics"]

CHUNK = 64  # images per Gram-matrix chunk: (chunk, T, T) stays small for T = 256


def _grid(tokens_NTD: Tensor, grid_hw: tuple[int, int] | None) -> tuple[int, int]:
    if tokens_NTD.ndim != 3:
        raise ValueError(f"expected tokens (num_images, T, D), got shape {tuple(tokens_NTD.shape)}")
    t = tokens_NTD.shape[1]
    if grid_hw is None:
        side = math.isqrt(t)
        if side * side != t:
            raise ValueError(f"{t} tokens are not a square grid; pass grid_hw")
        return side, side
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if h * w != t:
        raise ValueError(f"grid {h}x{w} does not hold {t} tokens")
    return h, w


def manhattan_distances(h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    """(T, T) Manhattan distances |i - i'| + |j - j'| between the tokens of a row-major h x w grid."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return (rows[:, None] - rows[None]).abs() + (cols[:, None] - cols[None]).abs()


def _unit(tokens_NTD: Tensor) -> Tensor:
    return F.normalize(tokens_NTD.double(), dim=-1, eps=1e-8)


@torch.no_grad()
def lds(tokens_NTD: Tensor, grid_hw: tuple[int, int] | None = None, far_dist: int = 6) -> float:
    """Local-vs-distant similarity: mean cosine of 4-neighbour token pairs minus mean cosine of the pairs at
    Manhattan distance >= `far_dist`, averaged over images. Higher = stronger spatial structure.

    Args:
        tokens_NTD: (num_images, T, D) tokens on a row-major grid.
        grid_hw: the grid (square when None).
        far_dist: the smallest "distant" Manhattan distance (6, iREPA's default).

    Raises:
        ValueError: the grid has no pair at distance >= far_dist (the official code then counts "far" as 0).
    """
    h, w = _grid(tokens_NTD, grid_hw)
    dist = manhattan_distances(h, w, tokens_NTD.device)
    far_mask = dist >= max(far_dist, 1)
    if not bool(far_mask.any()):
        raise ValueError(f"a {h}x{w} grid has no token pair at distance >= {far_dist}; lower far_dist")
    scores = []
    for chunk in _unit(tokens_NTD).split(CHUNK):
        grid = chunk.reshape(chunk.shape[0], h, w, -1)
        vertical = (grid[:, 1:] * grid[:, :-1]).sum(-1).flatten(1)  # (n, (h-1) w)
        horizontal = (grid[:, :, 1:] * grid[:, :, :-1]).sum(-1).flatten(1)  # (n, h (w-1))
        local = torch.cat([vertical, horizontal], dim=1).mean(dim=1)
        gram = chunk @ chunk.transpose(1, 2)  # (n, T, T) cosines
        far = gram[:, far_mask].mean(dim=1)
        scores.append(local - far)
    return float(torch.cat(scores).mean())


@torch.no_grad()
def cds(tokens_NTD: Tensor, grid_hw: tuple[int, int] | None = None, dmax: int = 8) -> float:
    """Correlation-decay slope: minus the least-squares slope of the mean cosine at Manhattan distance d against
    d = 1 .. dmax (distances the grid has), averaged over images. Higher = similarity decays faster with distance."""
    h, w = _grid(tokens_NTD, grid_hw)
    dist = manhattan_distances(h, w, tokens_NTD.device)
    ds = [d for d in range(1, dmax + 1) if bool((dist == d).any())]
    if len(ds) < 2:
        raise ValueError(f"a {h}x{w} grid has fewer than two distances in 1..{dmax}; the slope is undefined")
    x = torch.tensor(ds, dtype=torch.float64, device=tokens_NTD.device)
    x0 = x - x.mean()
    slopes = []
    for chunk in _unit(tokens_NTD).split(CHUNK):
        gram = chunk @ chunk.transpose(1, 2)
        sims = torch.stack([gram[:, dist == d].mean(dim=1) for d in ds], dim=1)  # (n, K)
        slopes.append(-((sims - sims.mean(dim=1, keepdim=True)) @ x0) / (x0 @ x0))
    return float(torch.cat(slopes).mean())


@torch.no_grad()
def rmsc(tokens_NTD: Tensor) -> float:
    """RMS spatial contrast: sqrt of the mean squared norm of the unit tokens minus their image mean, averaged over
    images (0 when every token of an image points the same way)."""
    if tokens_NTD.ndim != 3:
        raise ValueError(f"expected tokens (num_images, T, D), got shape {tuple(tokens_NTD.shape)}")
    unit = _unit(tokens_NTD)
    centred = unit - unit.mean(dim=1, keepdim=True)
    return float(centred.square().sum(dim=-1).mean(dim=1).sqrt().mean())


def spatial_metrics(tokens_NTD: Tensor, grid_hw: tuple[int, int] | None = None) -> dict[str, float]:
    """{"lds", "cds", "rmsc"} of the tokens with iREPA's defaults (far_dist 6, dmax 8)."""
    return {"lds": lds(tokens_NTD, grid_hw), "cds": cds(tokens_NTD, grid_hw), "rmsc": rmsc(tokens_NTD)}
