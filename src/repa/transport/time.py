"""Training-time distributions over t in [0, 1] (uniform, and SiT/REPA's log-normal noise-ratio weighting)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from repa.transport.paths import InterpolationPath, get_path

__all__ = ["TimeSampling", "sample_time", "time_from_uniform"]

TimeSampling = Literal["uniform", "lognormal"]


def _from_normal(normal: Tensor, path: str | InterpolationPath, mean: float, std: float) -> Tensor:
    """t such that sigma_t / alpha_t = exp(mean + std * normal) on `path`."""
    log_ratio = mean + std * normal
    p = get_path(path)
    if p.name == "linear":  # ratio / (1 + ratio) written stably
        return torch.sigmoid(log_ratio)
    return p.time_from_noise_ratio(log_ratio.exp())


def sample_time(
    batch: int,
    kind: TimeSampling = "uniform",
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    path: str | InterpolationPath = "linear",
) -> Tensor:
    """Draw `batch` training times.

    - "uniform": t ~ U(0, 1), one `torch.rand(batch)` draw (the same values as the official
      `torch.rand((B, 1, 1, 1))`).
    - "lognormal": the noise-to-signal ratio sigma_t / alpha_t is log-normal, exp(mean + std * n) with
      n ~ N(0, 1) (one `torch.randn(batch)` draw), as in REPA's `SILoss(weighting="lognormal")` (after EDM).
      On the linear path this is t = sigmoid(mean + std * n); on the cosine path t = (2 / pi) atan(exp(...)).

    Args:
        batch: number of times.
        kind: "uniform" or "lognormal".
        device: device of the draw (that of `generator` when one is given and device is None).
        generator: optional RNG; None uses the global RNG of `device`.
        mean, std: parameters of the log-normal ratio (ignored for "uniform").
        path: path whose noise ratio is log-normal (only used by "lognormal").

    Returns:
        (batch,) float32 times in [0, 1].
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if kind == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    if kind == "lognormal":
        return _from_normal(torch.randn(batch, device=device, generator=generator), path, mean, std)
    raise ValueError(f"unknown time sampling {kind!r}; choose 'uniform' or 'lognormal'")


def time_from_uniform(
    u: Tensor,
    kind: TimeSampling = "uniform",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    path: str | InterpolationPath = "linear",
) -> Tensor:
    """Map pre-drawn U(0, 1) values to training times of distribution `kind` (inverse-CDF transform).

    Lets a training loop draw one uniform per sample from its own (seed, step) generator regardless of the
    time distribution. "uniform" returns `u`; "lognormal" uses n = Phi^{-1}(u) (clamped away from 0 and 1),
    then the same map as `sample_time`.
    """
    if kind == "uniform":
        return u
    if kind == "lognormal":
        tiny = torch.finfo(u.dtype).eps
        return _from_normal(torch.special.ndtri(u.clamp(tiny, 1 - tiny)), path, mean, std)
    raise ValueError(f"unknown time sampling {kind!r}; choose 'uniform' or 'lognormal'")
