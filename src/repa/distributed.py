"""The one module that knows the distributed engine (Hugging Face Accelerate over torch.distributed)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from repa.hardware import resolve_precision


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
    of which micro-batch each rank sees), so Accelerate is told 1. `mixed_precision` "auto" becomes bf16 or "no" for
    this machine (`repa.hardware.resolve_precision`). `trackers` (`train.trackers`: "tensorboard",
    "wandb") become Accelerate's `log_with`, writing under `project_dir`; none = no tracker (Accelerate's default).
    """
    from accelerate import Accelerator  # imported on use: loading it costs every `repa` command start-up time
    from accelerate.utils import DistributedDataParallelKwargs

    if cpu is None:
        cpu = not torch.cuda.is_available()
    mixed_precision = resolve_precision(mixed_precision, "cpu" if cpu else "cuda")  # "auto": what this machine runs
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
    out = all_reduce_sum(tensor)
    return out / dist.get_world_size() if dist.is_available() and dist.is_initialized() else out


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


# ---- FSDP2 (`train.fsdp`): torch.distributed.fsdp.fully_shard over one process group, no Accelerate wrapper.
# Parameters, gradients and optimizer moments become DTensors sharded along dim 0; the EMA shadow is sharded the same
# way. Checkpoints gather everything to full tensors (`gather_full`), so FSDP, DDP and 1-process runs read and write
# the same files; a resume shards them again (`shard_like`, `shard_optimizer_state`).


def ensure_process_group() -> bool:
    """A process group for FSDP: the launcher's (torchrun / accelerate launch), or a private one-process group for a
    plain `repa train` (FSDP over one device). Returns True if this call created it (the caller destroys it)."""
    if dist.is_initialized():
        return False
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (an FSDP-sharded parameter, gradient or optimizer moment)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage: in-place ops write the parameter); other tensors as is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_model(model: torch.nn.Module, units: Sequence[torch.nn.Module], *, reshard_after_forward: bool = True,
                forward_methods: Sequence[str] = ()) -> torch.nn.Module:  # fmt: skip
    """FSDP2 in place: each of `units` (the transformer blocks) is one all-gather unit, the root keeps the rest
    (embedders, final layer, projectors). `forward_methods` are methods other than `forward` that run the model
    (e.g. `velocity`, `forward_hidden`): they gather the root's parameters as `forward` does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # the model's outputs are views (unpatchify, channel slices); nothing here modifies them in place, which is
    # what FSDP2's warning on every such output is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for name in forward_methods:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def gather_full(tree: Any, keep: bool = True) -> Any:
    """The tree (dicts, lists, tensors, numbers) with every DTensor replaced by the full tensor, on the CPU. A
    collective when the tree holds DTensors: every rank calls it with the same structure (an all-gather per tensor).
    `keep=False` (the ranks that do not write) drops each gathered tensor at once (None in its place), so only the
    writing rank holds the full state in host memory."""
    if isinstance(tree, dict):
        return {k: gather_full(v, keep) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(gather_full(v, keep) for v in tree)
    if not is_sharded(tree):
        return tree
    full = tree.full_tensor()  # one tensor at a time on the device
    return full.cpu() if keep else None


def _shard_as(full: Any, like: Any) -> Any:
    """`full` sharded with the mesh and placements of DTensor `like` (every rank holds `full`: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    if not is_sharded(like):
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"a checkpoint tensor of shape {tuple(full.shape)} cannot fill a parameter of shape "
                         f"{tuple(like.shape)}")  # fmt: skip
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def shard_like(full: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """A full state dict sharded as the (FSDP) module's own `like = module.state_dict()`; keys `like` lacks pass
    through (load_state_dict names them)."""
    return {k: _shard_as(v, like[k]) if k in like and torch.is_tensor(v) else v for k, v in full.items()}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict (integer parameter ids, as `Optimizer.state_dict()` writes it) with every
    parameter-shaped tensor sharded like its parameter, ready for `optimizer.load_state_dict`."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in full["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, params))
    state = {
        i: {k: _shard_as(v, by_id[i]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
        for i, s in full["state"].items()
    }
    return {**full, "state": state}


class Frozen:
    """A `state_dict()` fixed at construction (a gathered FSDP state handed to the rank-0 checkpoint writer)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def grad_norm(parameters: Sequence[torch.Tensor], max_norm: float = 0.0) -> torch.Tensor:
    """The global 2-norm of the gradients of (possibly sharded) parameters, clipped to `max_norm` when > 0 (torch's
    `clip_grad_norm_`, which reduces DTensor norms over the mesh); a plain float32 tensor on every rank."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    return (norm.full_tensor() if is_sharded(norm) else norm).float()


def all_reduce_max(value: float, device: torch.device | str = "cpu") -> float:
    """The largest `value` over all processes (NaN counts as +inf); `device` is one the process group serves."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value if value == value else float("inf")], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
