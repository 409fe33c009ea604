"""Class-balanced labels for evaluation sampling (e.g. 50 images per ImageNet class for FID-50K), split over ranks."""

from __future__ import annotations

import torch


def rank_slice(num: int, rank: int = 0, world_size: int = 1) -> slice:
    """The contiguous share of `num` items for `rank`: sizes differ by at most one, earlier ranks take the extra.

    Args:
        num: total items.
        rank: this process, in [0, world_size).
        world_size: number of processes.

    Returns:
        A slice into the global item order; concatenating all ranks' slices in rank order gives range(num).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    base, extra = divmod(num, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def balanced_labels(
    num_samples: int, num_classes: int, seed: int = 0, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Shuffled class labels with equal counts per class, identical for a given seed, this rank's share of them.

    Every class appears `num_samples // num_classes` times; when `num_classes` does not divide `num_samples`, a
    seeded random choice of `num_samples % num_classes` classes gets one more. The global list is shuffled with a
    generator seeded by `seed` only, so it does not depend on the number of processes.

    Args:
        num_samples: total number of labels over all ranks.
        num_classes: number of classes (labels are 0 .. num_classes - 1).
        seed: shuffle seed.
        rank: this process.
        world_size: number of processes.

    Returns:
        (n_rank,) int64 labels of this rank (see `rank_slice`).
    """
    if num_samples < 0 or num_classes < 1:
        raise ValueError(f"need num_samples >= 0 and num_classes >= 1, got {num_samples}, {num_classes}")
    g = torch.Generator().manual_seed(int(seed))
    class_order = torch.randperm(num_classes, generator=g)  # who gets the extra label when not divisible
    reps = -(-num_samples // num_classes)
    labels = class_order.repeat(reps)[:num_samples]
    labels = labels[torch.randperm(num_samples, generator=g)]
    return labels[rank_slice(num_samples, rank, world_size)].clone()
