"""The learning rate as a pure function of the update count: linear warm-up, then constant (the official recipe),
cosine or linear decay to a final lr reached at `train.max_steps`.

`torch.optim.lr_scheduler.LambdaLR` multiplies `optim.lr` by `lr_factor(n)`, n = the number of updates applied so far
(skipped non-finite steps do not count; the checkpoint stores n), so a resumed run gets the lr of an uninterrupted one
bit for bit. The REPA alignment weight's schedule (HASTE) is another idea with its own home: `repa.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from repa.config import Config
from repa.config.validate import LR_SCHEDULES

LRSchedule = Literal["constant", "cosine", "linear"]


def lr_factor(
    step: int,
    *,
    schedule: LRSchedule = "constant",
    warmup_steps: int = 0,
    total_steps: int = 0,
    final_ratio: float = 0.0,
) -> float:
    """The multiplier of the base lr for update `step` (0-indexed).

    Warm-up: `(step + 1) / warmup_steps` up to 1 (the factor of step `warmup_steps - 1` is 1). Then, over the steps
    `warmup_steps .. total_steps`, the decay from 1 to `final_ratio` (`final_lr / lr`) at progress
    `p = (step - warmup_steps) / (total_steps - warmup_steps)` (clamped to [0, 1]: `final_ratio` from
    `total_steps` on): cosine `r + (1 - r) (1 + cos(pi p)) / 2`, linear `1 - (1 - r) p`. `constant` keeps 1 after the
    warm-up (exactly the warm-up-only lambda this replaced).

    Args:
        step: the update count (the scheduler's `last_epoch`).
        schedule: constant, cosine or linear.
        warmup_steps: linear warm-up length (0 = none).
        total_steps: where the decay ends (`train.max_steps`).
        final_ratio: `optim.final_lr / optim.lr`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return min(1.0, (step + 1) / warmup_steps)
    if schedule == "constant":
        return 1.0
    span = total_steps - warmup_steps
    p = 1.0 if span <= 0 else min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return 1.0 - (1.0 - final_ratio) * p
    raise ValueError(f"unknown lr schedule {schedule!r} (valid: {', '.join(LR_SCHEDULES)})")


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """`LambdaLR`'s function for a run: `optim.lr_schedule`, `optim.warmup_steps`, `optim.final_lr / optim.lr`, the
    decay ending at `train.max_steps`."""
    o = cfg.optim
    kwargs = dict(schedule=o.lr_schedule, warmup_steps=o.warmup_steps, total_steps=cfg.train.max_steps,
                  final_ratio=o.final_lr / o.lr if o.lr > 0 else 0.0)  # fmt: skip

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict stores none (as before)
        return lr_factor(step, **kwargs)

    return factor


def lr_at(cfg: Config, step: int) -> float:
    """The lr of update `step` of a run (what `LambdaLR` sets: `optim.lr * factor`)."""
    return cfg.optim.lr * lr_lambda(cfg)(step)
