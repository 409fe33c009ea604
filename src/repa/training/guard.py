"""Nothing non-finite reaches the weights: an optimizer update is kept only if every parameter is still finite."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite: one fused norm pass (a NaN/inf element makes its tensor's norm
    NaN/inf); only if a norm is not finite, an exact per-tensor check (a 2-norm also overflows past ~1e19 per
    element, which is no reason to refuse anything)."""
    if not tensors:
        return True
    norms = torch._foreach_norm(list(tensors))
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class UpdateGuard:
    """`step()` runs `optimizer.step()` and undoes it bit for bit if it left a parameter NaN/inf.

    A finite loss and gradient norm do not make the update finite: AdamW with eps = 0 divides 0 by 0 where a
    gradient is 0, an overflowing learning rate sends weights to inf, a non-finite moment poisons every weight it
    touches. Before each step the parameters, the optimizer's state tensors (moments, step counts) and the fp16
    GradScaler's state are copied; after a refused step they are put back (and state the step created is removed),
    so a refused update changes nothing, like a skipped step. The moments stay finite when the state and the
    gradients are (|g| < 2e19 since the gradient norm is finite), so checking the parameters suffices; checkpoints
    are checked in full when written and loaded.

    Cost per step: one copy of the parameters and the optimizer state plus one read of the parameters, about 1.2% of
    a configs/tiny.yaml step on one CPU thread (docs/reliability.md). On the CPU the copies live in buffers kept
    between steps (allocating them anew costs 2-3x more: fresh pages); on CUDA they are allocated per step, from the
    caching allocator's blocks that the freed activations left, so the peak memory does not grow.

    Args:
        optimizer: the torch optimizer (or Accelerate's wrapper of it).
        params: the tensors it updates.
        scaler: the fp16 GradScaler stepping it, if any.
    """

    def __init__(self, optimizer: Any, params: Sequence[torch.Tensor], scaler: Any | None = None) -> None:
        self.optimizer, self.params, self.scaler = optimizer, list(params), scaler
        self.inner: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps it
        self.keep_buffers = all(p.device.type == "cpu" for p in self.params)
        self._buffers: list[torch.Tensor] = []

    def _live(self) -> list[torch.Tensor]:
        """What a step writes: the parameters, then their state tensors (none before the first step)."""
        state = [v for p in self.params if p in self.inner.state for v in self.inner.state[p].values()]
        return [p.detach() for p in self.params] + [v for v in state if torch.is_tensor(v)]

    @torch.no_grad()
    def step(self) -> bool:
        """Returns:
        True if the update was applied, False if it was refused (and undone)."""
        live = self._live()
        stepped = {p for p in self.params if p in self.inner.state}
        if not self.keep_buffers:
            saved = [t.clone() for t in live]
        else:
            if [b.shape for b in self._buffers] != [t.shape for t in live]:  # the first steps create the state
                self._buffers = [torch.empty_like(t) for t in live]
            saved = self._buffers
            torch._foreach_copy_(saved, live)
        scaler_state = self.scaler.state_dict() if self.scaler is not None else None
        self.optimizer.step()
        if all_finite(self.params):
            return True
        torch._foreach_copy_(live, saved)  # the step updated these tensors in place
        for p in [p for p in self.inner.state if p not in stepped]:  # created by this (first) step
            del self.inner.state[p]
        if scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
        return False
