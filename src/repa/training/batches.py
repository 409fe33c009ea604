"""Deterministic data order and per-step random draws: pure functions of (seed, step), so resume is exact and
N processes see the same global batch as one process."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from repa.seeds import generator


class GlobalOrder:
    """Epoch-wise shuffled order over `num_items`, with a per-epoch horizontal-flip bit per item.

    Position p (counted over the whole run, in samples) maps to item `perm_e[p % N]` of epoch e = p // N.
    """

    def __init__(self, num_items: int, seed: int, hflip: bool) -> None:
        if num_items < 1:
            raise ValueError("the training set is empty")
        self.num_items = num_items
        self.seed = seed
        self.hflip = hflip
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)
        self._flip = torch.empty(0, dtype=torch.bool)

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            g = generator(self.seed, 1, epoch)
            self._perm = torch.randperm(self.num_items, generator=g)
            if self.hflip:
                self._flip = torch.randint(0, 2, (self.num_items,), generator=g).bool()
            else:
                self._flip = torch.zeros(self.num_items, dtype=torch.bool)
            self._epoch = epoch

    def take(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, flips) for positions start .. start + count - 1."""
        idx, flips = [], []
        pos = start
        while pos < start + count:
            epoch, offset = divmod(pos, self.num_items)
            self._load_epoch(epoch)
            n = min(self.num_items - offset, start + count - pos)
            idx.append(self._perm[offset : offset + n])
            flips.append(self._flip[offset : offset + n])
            pos += n
        return torch.cat(idx), torch.cat(flips)


@dataclass
class MicroBatchPlan:
    """Where this rank's slice of global micro-batch `micro` of optimizer step `step` lies."""

    local_batch: int
    world_size: int
    rank: int
    grad_accum_steps: int

    @property
    def global_micro(self) -> int:
        return self.local_batch * self.world_size

    def position(self, step: int, micro: int) -> int:
        """First sample position of the global micro-batch."""
        return (step * self.grad_accum_steps + micro) * self.global_micro

    def local_slice(self) -> slice:
        return slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)


def step_draws(
    seed: int,
    step: int,
    micro: int,
    global_micro: int,
    sample_shape: tuple[int, ...],
    label_dropout: float,
    posterior: bool = False,
    teacher: bool = False,
    class_token_dim: int = 0,
) -> dict[str, torch.Tensor]:
    """The random draws of one global micro-batch: t ~ U(0,1) (B,), noise (B, *sample_shape), the label drop
    mask (B,) bool, and with `posterior` the VAE posterior draw eps (B, *sample_shape). The REPA family adds its own
    streams (the others stay as they are): SRA's `teacher_u` (B,) uniform time-gap draw with `teacher`, REG's
    `noise_cls` (B, class_token_dim) with `class_token_dim`. The caller slices its rank's rows, so every process
    count gives identical draws."""
    g = generator(seed, 2, step, micro)
    u = torch.rand(global_micro, generator=g)
    noise = torch.randn((global_micro, *sample_shape), generator=g)
    drop = torch.rand(global_micro, generator=g) < label_dropout
    out = {"u": u, "noise": noise, "drop": drop}
    if posterior:
        out["eps"] = torch.randn((global_micro, *sample_shape), generator=generator(seed, 5, step, micro))
    if teacher:
        out["teacher_u"] = torch.rand(global_micro, generator=generator(seed, 6, step, micro))
    if class_token_dim:
        out["noise_cls"] = torch.randn((global_micro, class_token_dim), generator=generator(seed, 7, step, micro))
    return out
