"""Nothing non-finite reaches the weights: an optimizer update is kept only if every parameter is still finite."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from repa import distributed
from repa.errors import ReportedError

SAFE_MARGIN = 1e-8  # a bounded update stays below this share of the dtype's largest value: rounding cannot matter


class NonFiniteError(ReportedError, RuntimeError):
    """Too many steps with NaN/inf loss, gradients or updates, or an optimizer state that turned NaN/inf."""

    exit_code = 5


def finite_norms(tensors: Sequence[torch.Tensor]) -> tuple[bool, float]:
    """(every element finite, the largest 2-norm of a tensor = a bound on every |element|), from one fused norm
    pass (a NaN/inf element makes its tensor's norm NaN/inf). Only if a norm is not finite, an exact per-tensor
    check (a 2-norm also overflows past ~1e19 per element, no reason to refuse anything)."""
    if not tensors:
        return True, 0.0
    largest = float(torch.stack([n.float() for n in torch._foreach_norm(list(tensors))]).max())
    if math.isfinite(largest):
        return True, largest
    return all(bool(torch.isfinite(t).all()) for t in tensors), math.inf


class UpdateGuard:
    """`step()` runs `optimizer.step()`; an update that leaves a parameter NaN/inf is undone bit for bit.

    A finite loss and gradient norm do not make the update finite: AdamW with eps = 0 divides 0 by 0 where a
    gradient is 0, an overflowing learning rate sends weights to inf. Every step ends with one read of the
    parameters (a fused norm, ~0.5% of a configs/tiny.yaml step: `benchmarks.micro --guard`). Undoing needs copies
    of the parameters and the optimizer state from before the step; taking them every step would cost about as much
    again as the update itself (a read and a write of three times the weights: ~1% of that step, and 3x the weights'
    memory). They are not needed when the update provably cannot overflow: AdamW moves a weight by at most
    lr / (1 - beta1) * max|m| / eps (the bias-corrected step size times the first moment over a denominator >= eps),
    and max|m| <= max(its previous bound, the gradient norm). So the copies are taken only when that bound plus the
    largest weight is not far inside the weights' dtype range (eps <= 0, beta >= 1, an absurd lr, another optimizer,
    fp16 loss scaling); a refused update then puts back the parameters, the optimizer state (removing what a first
    step created) and the GradScaler's state, like a skipped step. An update within the bound that still produces
    NaN/inf means the optimizer state itself was NaN/inf (a bug, memory corruption): it cannot be undone, and
    `NonFiniteError` stops the run before anything is saved.

    Args:
        optimizer: the torch optimizer (or Accelerate's wrapper of it).
        params: the tensors it updates.
        scaler: the fp16 GradScaler stepping it, if any.
    """

    def __init__(self, optimizer: Any, params: Sequence[torch.Tensor], scaler: Any | None = None) -> None:
        self.optimizer, self.params, self.scaler = optimizer, list(params), scaler
        self.inner: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps it
        # on the CPU fresh pages make per-step copies 2-3x dearer than reused buffers; on CUDA the caching allocator
        # hands out the blocks the freed activations left, so per-step copies do not raise the peak memory
        self.keep_buffers = all(p.device.type == "cpu" for p in self.params)
        self._buffers: list[torch.Tensor] = []
        self._weights: float | None = None  # bound on |parameter| (largest tensor 2-norm)
        self._moment = 0.0  # bound on |first moment|
        self._limit = min((torch.finfo(p.dtype).max for p in self.params), default=0.0) * SAFE_MARGIN
        # FSDP: each rank checks its shards, and the verdict and bound are the maxima over the ranks (all agree)
        self.sharded = any(distributed.is_sharded(p) for p in self.params)

    def _norms(self, tensors: Sequence[torch.Tensor]) -> tuple[bool, float]:
        """`finite_norms` of the local shards, reduced over the ranks when the parameters are sharded."""
        finite, largest = finite_norms([distributed.local(t) for t in tensors])
        if self.sharded:
            device = self.params[0].device
            finite = distributed.all_reduce_max(0.0 if finite else 1.0, device) == 0.0
            largest = distributed.all_reduce_max(largest, device)
        return finite, largest

    @torch.no_grad()
    def step(self, grad_norm: float) -> bool:
        """Apply the update of gradients whose (finite) norm is `grad_norm`.

        Returns:
            True if the update was applied, False if it made a parameter NaN/inf and was undone.

        Raises:
            NonFiniteError: an update that cannot overflow made a parameter NaN/inf (a NaN/inf optimizer state).
        """
        if self._weights is None:
            self._start()
        self._moment = max(self._moment, grad_norm)  # |m_new| <= max(|m|, |g|) and |g| <= the gradient norm
        if self._cannot_overflow():
            self.optimizer.step()
            finite, self._weights = self._norms(self.params)
            if not finite:
                raise NonFiniteError("an optimizer update that cannot overflow made weights NaN/inf: the optimizer "
                                     "state holds NaN/inf (a bug or memory corruption). Nothing was saved since the "
                                     "newest checkpoint; rerun the same command to resume from it")  # fmt: skip
            return True
        live, stepped = self._live(), {p for p in self.params if p in self.inner.state}
        saved = self._copy(live)
        scaler_state = self.scaler.state_dict() if self.scaler is not None else None
        self.optimizer.step()
        finite, weights = self._norms(self.params)
        if finite:
            self._weights = weights
            return True
        torch._foreach_copy_(live, saved)  # the step updated these tensors in place
        for p in [p for p in self.inner.state if p not in stepped]:  # created by this (first) step
            del self.inner.state[p]
        if scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
        return False

    def _start(self) -> None:
        """The bounds at the first step (after a resume the optimizer state is there already)."""
        _, self._weights = self._norms(self.params)
        state = [self.inner.state[p] for p in self.params if p in self.inner.state]
        self._moment = self._norms([s["exp_avg"] for s in state if torch.is_tensor(s.get("exp_avg"))])[1]

    def _cannot_overflow(self) -> bool:
        if self.scaler is not None or not isinstance(self.inner, torch.optim.AdamW) or self._moment > 1e18:
            return False  # (a gradient norm above 1e18 could overflow the second moment's g^2)
        for group in self.inner.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            if group.get("amsgrad") or group.get("maximize") or torch.is_tensor(lr):
                return False
            if not (eps > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and 0 <= lr and 0 <= decay):
                return False
            bound = self._weights * max(1.0, abs(1 - lr * decay)) + lr / (1 - beta1) * self._moment / eps
            if not bound < self._limit:  # also false for NaN/inf
                return False
        return True

    def _live(self) -> list[torch.Tensor]:
        """What a step writes: the parameters, then their state tensors (none before the first step)."""
        state = [v for p in self.params if p in self.inner.state for v in self.inner.state[p].values()]
        local = distributed.local  # FSDP: the shards (their storage is the parameters' and moments')
        return [local(p).detach() for p in self.params] + [local(v) for v in state if torch.is_tensor(v)]

    def _copy(self, live: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.keep_buffers:
            return [t.clone() for t in live]
        if [b.shape for b in self._buffers] != [t.shape for t in live]:  # the first steps create the state
            self._buffers = [torch.empty_like(t) for t in live]
        torch._foreach_copy_(self._buffers, live)
        return self._buffers
