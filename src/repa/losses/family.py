"""The REPA family's extra terms as pure functions: HASTE's alignment schedule and attention alignment, SRA's teacher
time and self-alignment loss (REG's class-token term is a denoising loss; see `RepaLoss`)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from repa.losses.terms import _fp32, _square_grid, resample_tokens

ScheduleKind = Literal["constant", "stop", "linear", "cosine"]
SelfAlignKind = Literal["cos", "smooth_l1"]


def align_weight(
    step: int, kind: ScheduleKind = "constant", *, stop_step: int | None = None, start_step: int = 0
) -> float:
    """Multiplier of the alignment coefficient at optimizer step `step` (0 = the first step): a pure function of the
    step, so resumed runs replay it. HASTE (arXiv 2505.16792) uses "stop": full alignment, then none from
    `stop_step` on (its `global_step >= early_stop_point` test; 250000 in the official script).

    - "constant": 1.
    - "stop": 1 for step < stop_step, else 0.
    - "linear": 1 up to start_step, then 1 - (step - start_step) / (stop_step - start_step), 0 from stop_step.
    - "cosine": 1 up to start_step, then (1 + cos(pi p)) / 2 with p = (step - start_step) / (stop_step - start_step),
      0 from stop_step.

    Raises:
        ValueError: unknown kind, missing stop_step, or stop_step <= start_step for a decay.
    """
    if kind == "constant":
        return 1.0
    if kind not in ("stop", "linear", "cosine"):
        raise ValueError(f"unknown schedule {kind!r}; choose 'constant', 'stop', 'linear' or 'cosine'")
    if stop_step is None or stop_step < 0:
        raise ValueError(f"schedule {kind!r} needs stop_step >= 0, got {stop_step}")
    if kind == "stop":
        return 1.0 if step < stop_step else 0.0
    if not 0 <= start_step < stop_step:
        raise ValueError(f"schedule {kind!r} needs 0 <= start_step < stop_step, got {start_step}, {stop_step}")
    progress = min(max((step - start_step) / (stop_step - start_step), 0.0), 1.0)
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def resample_attention(
    attn_BHMM: Tensor, grid_hw: tuple[int, int] | int, *, src_grid_hw: tuple[int, int] | None = None
) -> Tensor:
    """Attention maps (rows = queries, columns = keys, both on a row-major grid) resampled to another grid.

    Both token axes are resampled like `resample_tokens` (bilinear, anti-aliased when shrinking: non-negative
    weights), then each row is renormalised to sum to 1. Identity (the input itself) when the grids match.

    Returns:
        (B, H, N', N') row-stochastic maps.
    """
    b, h, m, _ = attn_BHMM.shape
    src = src_grid_hw if src_grid_hw is not None else _square_grid(m, "the attention map")
    if tuple(src) == ((grid_hw, grid_hw) if isinstance(grid_hw, int) else tuple(grid_hw)):
        return attn_BHMM
    x = attn_BHMM.reshape(b * h, m, m).transpose(1, 2)  # (BH, keys, queries): resample the keys
    x = resample_tokens(x, grid_hw, src_grid_hw=src_grid_hw).transpose(1, 2)  # (BH, queries, keys')
    x = resample_tokens(x, grid_hw, src_grid_hw=src_grid_hw).clamp_min(0)  # (BH, queries', keys')
    x = x / x.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return x.reshape(b, h, x.shape[1], x.shape[2])


def attention_alignment_per_sample(
    logits_BHNN: Tensor,
    target_BHMM: Tensor,
    *,
    resample: bool = True,
    pred_grid_hw: tuple[int, int] | None = None,
    target_grid_hw: tuple[int, int] | None = None,
) -> Tensor:
    """HASTE's attention alignment (arXiv 2505.16792, official `loss.py`): cross-entropy between the teacher's
    attention rows and the model's, H(p_enc, softmax(logits)) = -sum_j p_enc[i, j] log softmax(logits[i])_j,
    averaged over heads and query tokens. Only the first min(H_model, H_enc) heads of each are paired (HASTE pairs
    SiT-XL's first 12 of 16 heads with DINOv2-B's 12). fp32, autocast off.

    Args:
        logits_BHNN: (B, H, N, N) the model's pre-softmax attention logits Q K^T / sqrt(d) over its patch tokens.
        target_BHMM: (B, H', M, M) the encoder's patch-to-patch attention probabilities (rows sum to 1).
        resample: resample the target maps to the model grid when N != M (else ValueError).
        pred_grid_hw, target_grid_hw: the grids (square when None).

    Returns:
        (B,) losses (>= the teacher rows' entropy; equal iff the model's rows match).
    """
    if logits_BHNN.ndim != 4 or target_BHMM.ndim != 4 or logits_BHNN.shape[0] != target_BHMM.shape[0]:
        raise ValueError(
            f"expected (B, H, N, N) maps with the same batch, got {tuple(logits_BHNN.shape)} and {tuple(target_BHMM.shape)}"
        )
    with torch.autocast(device_type=logits_BHNN.device.type, enabled=False):
        heads = min(logits_BHNN.shape[1], target_BHMM.shape[1])
        logits, target = _fp32(logits_BHNN[:, :heads]), _fp32(target_BHMM[:, :heads])
        n, m = logits.shape[-1], target.shape[-1]
        if n != m or (pred_grid_hw is not None and target_grid_hw is not None and pred_grid_hw != target_grid_hw):
            if not resample:
                raise ValueError(f"model attention covers {n} tokens but the encoder's {m}; enable resampling")
            grid = pred_grid_hw if pred_grid_hw is not None else _square_grid(n, "the model")
            target = resample_attention(target, grid, src_grid_hw=target_grid_hw).to(logits.dtype)
        return -(target * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean(dim=(1, 2))


def teacher_time(t: Tensor, u: Tensor, gap: float, num_timesteps: int | None = None) -> Tensor:
    """SRA's teacher time (arXiv 2505.02831, official `loss.py`): a smaller noise level than the student's.

    Flow (t in [0, 1], 0 = data): clamp(t - gap * u, 0, 1) (SiT-SRA: t_max = 0.2). DDPM (integer steps,
    `num_timesteps` T given): clamp(t - floor(u * floor(gap * T)), 1, T - 1) (DiT-SRA: randint(0, t_max)).

    Args:
        t: (B,) student times (float) or DDPM steps (long).
        u: (B,) uniform draws in [0, 1).
        gap: the largest time gap, as a fraction of the time range.
        num_timesteps: DDPM steps T; None for flow.
    """
    u = u.to(t.device)
    if num_timesteps is None:
        return (t - gap * u.to(t.dtype)).clamp(0.0, 1.0)
    steps = (u * int(gap * num_timesteps)).long()
    return (t.long() - steps).clamp(1, num_timesteps - 1)


def self_alignment_per_sample(
    student_BND: Tensor, teacher_BND: Tensor, kind: SelfAlignKind = "cos", beta: float = 0.05
) -> Tensor:
    """SRA's self-alignment (arXiv 2505.02831): the student's head output against the EMA teacher's hidden tokens,
    which get no gradient (detached here). fp32, autocast off.

    - "cos": mean over tokens of 1 - cos(student[n], teacher[n]) over the feature dimension (the official code's
      current default loss, which its README recommends over the paper's smooth-L1).
    - "smooth_l1": the paper's smooth-L1 (Huber, beta 0.05), mean over tokens and features.

    Returns:
        (B,) losses.
    """
    if student_BND.shape != teacher_BND.shape:
        raise ValueError(f"student {tuple(student_BND.shape)} and teacher {tuple(teacher_BND.shape)} tokens differ")
    with torch.autocast(device_type=student_BND.device.type, enabled=False):
        s, t = _fp32(student_BND), _fp32(teacher_BND.detach())
        if kind == "cos":
            return 1.0 - F.cosine_similarity(s, t, dim=-1).mean(dim=-1)
        if kind == "smooth_l1":
            return F.smooth_l1_loss(s, t, beta=beta, reduction="none").mean(dim=(1, 2))
        raise ValueError(f"unknown self-alignment kind {kind!r}; choose 'cos' or 'smooth_l1'")
