"""The one module that knows the distributed engine (Hugging Face Accelerate over torch.distributed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def make_accelerator(
    mixed_precision: str = "no",
    cpu: bool | None = None,
    *,
    trackers: Sequence[str] = (),
    project_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """Create the Accelerator for this run (its first creation in a process sets up the process group).

    One process, `torchrun`/`accelerate launch` multi-process, and multi-node launches all come through here;
    on CPU the process group uses gloo. Gradient accumulation is done by the loop (it needs exact control
    of which micro-batch each rank sees), so Accelerate is told 1. `trackers` (`train.trackers`: "tensorboard",
    "wandb") become Accelerate's `log_with`, writing under `project_dir`; none = no tracker (Accelerate's default).
    """
    from accelerate import Accelerator  # imported on use: loading it costs every `repa` command start-up time
    from accelerate.utils import DistributedDataParallelKwargs

    if cpu is None:
        cpu = not torch.cuda.is_available()
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)
    return Accelerator(
        mixed_precision=mixed_precision,
        cpu=cpu,
        kwargs_handlers=[ddp_kwargs],
        step_scheduler_with_optimizer=False,
        log_with=list(trackers) or None,
        project_dir=None if not trackers or project_dir is None else str(project_dir),
    )


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's index on its machine (the launcher's LOCAL_RANK; 0 in one process)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def init_process_group(backend: str = "gloo", timeout: timedelta | None = None) -> None:
    """Join the launcher's process group (torchrun / accelerate launch set WORLD_SIZE, RANK, MASTER_ADDR) without an
    Accelerator, for jobs that need only `barrier`; a no-op in one process or once a group exists."""
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)


def is_main() -> bool:
    """Rank 0: the process that writes files and prints."""
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
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
    """Sum of `tensor` over all processes (a copy; the input is untouched)."""
    out = tensor.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every process along dim 0 (rank order)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
