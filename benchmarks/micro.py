"""Micro-benchmarks of the step's small phases: AdamW (loop/foreach/fused), EMA (loop/foreach), attention kernels.

    python -m benchmarks.micro --model SiT-B/2 --reps 7

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


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.micro`."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
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
