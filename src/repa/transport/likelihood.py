"""Gaussian log-likelihood terms of DDPM's variational bound: KL between Gaussians and the discretised decoder.

Ho et al. 2020 (Eq. 13) and Nichol & Dhariwal 2021, with the same tanh approximation of the normal CDF as their code
and DiT's (`diffusion/diffusion_utils.py`), so bits/dim are identical. Used by `repa.transport.ddpm`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["discretized_gaussian_log_likelihood", "mean_flat", "normal_kl"]


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    # the tanh approximation used by DDPM/iDDPM/DiT (kept for identical bits/dim)
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log-likelihood of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)) (DDPM Eq. 13).

    Returns:
        elementwise log-probabilities (nats), same shape as x.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_probs))
    return log_probs


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every axis but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))
