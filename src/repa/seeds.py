"""Seeds as pure functions of (seed, step, ...): every random draw of training, sampling and evaluation derives
from one integer seed and integer coordinates, so resume is exact and N processes match one process."""

from __future__ import annotations

import torch

_MIX = 0x9E3779B1  # odd 32-bit constant to decorrelate seeds derived from (seed, a, b)


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from `seed` and integers (epoch, step, micro-batch, stream id)."""
    h = seed & 0x7FFFFFFFFFFFFFFF
    for p in parts:
        h = (h * _MIX + p + 0x632BE5AB) & 0x7FFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


def generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded with `derive_seed(seed, *parts)`."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts))
