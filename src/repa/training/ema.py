"""Exponential moving average of model weights, updated in place with fused foreach ops."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from repa import distributed


class EMA:
    """EMA of a module's floating-point parameters and buffers.

    The shadow model is a frozen copy kept in eval mode; `update` runs after the optimizer step on the
    unwrapped module (never the DDP/FSDP wrapper) with one `torch._foreach_lerp_` over all tensors.

    Args:
        model: the module to track (its current weights initialise the average).
        decay: target decay (0.9999 in the official recipe).
        warmup: if True, decay at step s is min(decay, (1 + s) / (10 + s)), so short runs are not dominated
            by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = self._match()

    def _match(self) -> tuple[list[torch.Tensor], list[str]]:
        """The shadow's floating-point parameters and their names (the tracked model's names are the same)."""
        dst = dict(self.model.named_parameters())
        keys = [k for k in dst if dst[k].is_floating_point()]
        return [dst[k] for k in keys], keys

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """shadow <- decay * shadow + (1 - decay) * params  (step = optimizer steps taken before this one)."""
        decay = min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay
        params = dict(model.named_parameters())
        shadow, keys = self._pairs
        # FSDP: each rank averages its own shards (the model's and the shadow's are laid out alike)
        local = distributed.local
        torch._foreach_lerp_([local(s) for s in shadow], [local(params[k]).detach() for k in keys], 1.0 - decay)

    def shard(self, shard: Callable[[nn.Module], nn.Module]) -> None:
        """Shard the shadow model as the trained one is sharded (`train.fsdp`: `shard` applies `fully_shard`)."""
        self.model = shard(self.model)
        self._pairs = self._match()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
