"""Micro-benchmarks of the step's small phases: AdamW (loop/foreach/fused), EMA (loop/foreach), attention kernels;
and the cost of the loop's update guard on a preset's whole step.

    python -m benchmarks.micro --model SiT-B/2 --reps 7
    python -m benchmarks.micro --guard configs/tiny.yaml --reps 40

Implementations are interleaved rep by rep (load from other jobs hits them alike); medians are printed.
Gradients are random (1e-3 scale) so no value is zero or subnormal; EMA and AdamW see the real parameter set.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def optimizer_and_ema(model_name: str, reps: int) -> dict[str, float]:
    """Median seconds of one AdamW step per implementation and one EMA update per implementation."""
    from benchmarks.harness import BenchConfig, ema_update_loop, encoder_geometry, make_optimizer
    from repa.models import build_model
    from repa.training.ema import EMA

    dim = encoder_geometry(BenchConfig(model=model_name))[0]
    model = build_model(model_name, encoder_dims=[dim])
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    ema = EMA(model, 0.9999)
    runs: dict[str, Callable[[], object]] = {
        f"adamw-{k}": make_optimizer(params, k).step for k in ("loop", "foreach", "fused")
    }
    runs["clip_grad_norm_"] = lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)
    runs["ema-loop"] = lambda: ema_update_loop(ema.model, model, 0.9999)
    runs["ema-foreach"] = lambda: ema.update(model, 0)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(reps + 1):
        for name, fn in runs.items():
            t = _time(fn)
            if rep:  # the first rep allocates optimizer state
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def attention(batch: int, heads: int, tokens: int, head_dim: int, reps: int) -> dict[str, float]:
    """Median forward+backward seconds of SDPA per CPU backend at the given shape."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, heads, tokens, head_dim, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, tokens, head_dim)
    out: dict[str, list[float]] = {"sdpa-flash": [], "sdpa-math": []}
    for rep in range(reps + 1):
        for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-math", SDPBackend.MATH)):
            with sdpa_kernel([backend]):
                t = _time(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad))
            if rep:
                out[name].append(t)
    return {k: statistics.median(v) for k, v in out.items()}


def guard_cost(config: str, reps: int, block: int = 5) -> dict[str, float]:
    """Median seconds of one training step of `config`'s model, loss and batch (random data and targets of the
    preset's shapes), with the optimizer stepped through the loop's `UpdateGuard` or directly, and of the update
    phase alone (where the two differ: the guard's finiteness pass over the weights, and copies when an update could
    overflow). The variants alternate in blocks of `block` steps on the same model, so drift of the machine falls
    on both alike; the overhead is the update phases' difference over the whole step (a difference of two whole
    steps would drown it in their noise)."""
    from repa.config import load_config
    from repa.training.ema import EMA
    from repa.training.guard import UpdateGuard
    from repa.training.setup import build_loss, build_model

    cfg = load_config(config)
    gen = torch.Generator().manual_seed(0)
    n, side, channels, classes, dim = cfg.train.global_batch_size, cfg.data.resolution, 1, 10, 384

    class Shape:  # the preset's data as the model builder sees it (Fashion-MNIST: 1 x 28 x 28, 10 classes)
        sample_shape, num_classes = (channels, side, side), classes

    grid = side // int(cfg.model.name.split("/")[-1])
    torch.manual_seed(0)
    model = build_model(cfg, Shape(), [("target", dim, (grid, grid))])
    loss_fn = build_loss(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps, fused=True)
    ema = EMA(model, cfg.optim.ema_decay)
    guard = UpdateGuard(opt, list(model.parameters()))
    x, y = torch.randn(n, channels, side, side, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    targets = [torch.randn(n, grid * grid, dim, generator=gen)]

    def step(guarded: bool) -> tuple[float, float]:
        """(seconds of the whole step, seconds of its update phase)."""
        start = time.perf_counter()
        terms = loss_fn(model, x, y, targets, generator=gen)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        update = _time(lambda: guard.step(float(norm)) if guarded else opt.step())
        ema.update(model, 0)
        return time.perf_counter() - start, update

    names = {False: "optimizer.step()", True: "UpdateGuard.step()"}
    steps: dict[bool, list[float]] = {False: [], True: []}
    updates: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(reps + 1):
        for guarded in (False, True):
            for _ in range(block):
                whole, update = step(guarded)
                if rep:  # the first block allocates optimizer state and warms the allocator
                    steps[guarded].append(whole)
                    updates[guarded].append(update)
    res = {f"step with {names[g]}": statistics.median(steps[g]) for g in names}
    res.update({f"update phase: {names[g]}": statistics.median(updates[g]) for g in names})
    extra = res["update phase: UpdateGuard.step()"] - res["update phase: optimizer.step()"]
    res["guard overhead (extra update time / step)"] = extra / res["step with optimizer.step()"]
    return res


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.micro`."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--guard", metavar="CONFIG", default=None, help="measure the update guard on CONFIG's step instead")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.guard:
        res = guard_cost(args.guard, args.reps)
        print(f"| {args.guard}, {args.threads} threads, median of {args.reps} blocks of 5 steps | value |\n|---|---|")
        for k, v in res.items():
            print(f"| {k} | {v:+.2%} |" if k.startswith("guard") else f"| {k} | {v:.4f} s |")
        return 0
    from repa.models import MODELS

    res = optimizer_and_ema(args.model, args.reps)
    cfg = MODELS[args.model]
    tokens = (cfg["input_size"] // cfg["patch_size"]) ** 2
    res.update(attention(8, cfg["num_heads"], tokens, cfg["hidden_size"] // cfg["num_heads"], args.reps))
    print(f"| {args.model}, {args.threads} threads, median of {args.reps} | seconds |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
