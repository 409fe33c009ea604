"""The one module that knows the distributed engine (Hugging Face Accelerate over torch.distributed)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

_ACCELERATOR: Any = None


def make_accelerator(mixed_precision: str = "no", grad_accum_steps: int = 1, cpu: bool | None = None) -> Any:
    """Create (once per process) the Accelerator for this run.

    One process, `torchrun`/`accelerate launch` multi-process, and multi-node launches all come through here;
    on CPU the process group uses gloo. Gradient accumulation is done by the loop (it needs exact control
    of which micro-batch each rank sees), so Accelerate is told 1.
    """
    global _ACCELERATOR
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cpu is None:
        cpu = not torch.cuda.is_available()
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)
    _ACCELERATOR = Accelerator(
        mixed_precision=mixed_precision,
        cpu=cpu,
        kwargs_handlers=[ddp_kwargs],
        step_scheduler_with_optimizer=False,
    )
    del grad_accum_steps  # accumulation is explicit in the loop
    return _ACCELERATOR


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all processes (a copy; the input is untouched)."""
    out = tensor.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every process along dim 0 (rank order)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
