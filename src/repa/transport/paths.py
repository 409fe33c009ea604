"""Interpolation paths x_t = alpha_t x + sigma_t noise (t = 0 data, t = 1 noise) and prediction conversions."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["PATHS", "CosinePath", "InterpolationPath", "LinearPath", "PathName", "expand_t", "get_path"]

PathName = Literal["linear", "cosine"]


def expand_t(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a time to `x`: a python float / 0-d tensor stays a scalar, a (B,) tensor becomes (B, 1, ..., 1).

    Args:
        t: scalar or (B,) times; a tensor already of x's rank is returned as is.
        x: tensor of shape (B, ...).

    Returns:
        A tensor on x's device that broadcasts against `x` (dtype of `t`, or of `x` for python floats).
    """
    if not isinstance(t, Tensor):
        return torch.tensor(t, dtype=x.dtype, device=x.device)
    t = t.to(device=x.device)
    if t.ndim == 0 or t.ndim == x.ndim:
        return t
    if t.ndim == 1 and t.shape[0] == x.shape[0]:
        return t.reshape(-1, *([1] * (x.ndim - 1)))
    raise ValueError(f"time of shape {tuple(t.shape)} does not broadcast to x of shape {tuple(x.shape)}")


class InterpolationPath:
    """A path x_t = alpha(t) x + sigma(t) noise with velocity v = d_alpha(t) x + d_sigma(t) noise (REPA Sec. 2).

    Subclasses define the four schedule functions; everything else (interpolation, targets and the conversions
    between velocity, score, noise (eps) and x predictions) is derived here once. All methods take `t` as a
    python float, a 0-d tensor or a (B,) tensor, broadcast to the data (see `expand_t`).

    Conversions solve the 2x2 linear system [x_t; v] = [[alpha, sigma], [d_alpha, d_sigma]] [x; noise] whose
    determinant `det = alpha d_sigma - sigma d_alpha` is 1 (linear) or pi/2 (cosine): never zero, so the
    x / noise predictions are defined on all of [0, 1]. The score of p_t is -E[noise | x_t] / sigma_t
    (Tweedie), undefined at t = 0 where sigma = 0.
    """

    name: str = "base"

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def coefficients(self, t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha, sigma, d_alpha, d_sigma) at `t`, broadcast against `like`."""
        t = expand_t(t, like)
        return self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)

    # ------------------------------------------------------------------------------------- forward process

    def interpolate(self, x: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """x_t = alpha_t x + sigma_t noise.

        Args:
            x: clean data (B, ...).
            noise: standard normal noise, same shape.
            t: (B,) or scalar times in [0, 1].

        Returns:
            x_t, same shape as x.
        """
        alpha, sigma, _, _ = self.coefficients(t, x)
        return alpha * x + sigma * noise

    def velocity_target(self, x: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """v_t = d x_t / dt = d_alpha_t x + d_sigma_t noise (the regression target of v-prediction).

        Args:
            x: clean data (B, ...).
            noise: noise, same shape.
            t: (B,) or scalar times.

        Returns:
            the velocity, same shape as x.
        """
        _, _, d_alpha, d_sigma = self.coefficients(t, x)
        return d_alpha * x + d_sigma * noise

    # ------------------------------------------------------------------------------------- conversions

    def _det(self, t: Tensor | float, like: Tensor) -> tuple[Tensor, ...]:
        alpha, sigma, d_alpha, d_sigma = self.coefficients(t, like)
        return alpha, sigma, d_alpha, d_sigma, alpha * d_sigma - sigma * d_alpha

    def velocity_to_x(self, v: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """x prediction from a velocity prediction: x = (d_sigma x_t - sigma v) / det."""
        _, sigma, _, d_sigma, det = self._det(t, x_t)
        return (d_sigma * x_t - sigma * v) / det

    def velocity_to_noise(self, v: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """noise (eps) prediction from a velocity prediction: noise = (alpha v - d_alpha x_t) / det."""
        alpha, _, d_alpha, _, det = self._det(t, x_t)
        return (alpha * v - d_alpha * x_t) / det

    def velocity_to_score(self, v: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Score grad log p_t(x_t) from a velocity prediction (t > 0).

        Equals the official REPA/SiT formula r = alpha / d_alpha, var = sigma^2 - r d_sigma sigma,
        s = (r v - x_t) / var (multiply numerator and denominator by d_alpha), written as
        s = -noise / sigma = (d_alpha x_t - alpha v) / (sigma det), which avoids dividing by d_alpha
        (zero at t = 0 on the cosine path).
        """
        alpha, sigma, d_alpha, _, det = self._det(t, x_t)
        return (d_alpha * x_t - alpha * v) / (sigma * det)

    def x_to_velocity(self, x_pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Velocity from an x prediction: v = (d_sigma x_t - det x) / sigma (t > 0)."""
        _, sigma, _, d_sigma, det = self._det(t, x_t)
        return (d_sigma * x_t - det * x_pred) / sigma

    def noise_to_velocity(self, noise_pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Velocity from a noise (eps) prediction: v = (det noise + d_alpha x_t) / alpha (t < 1)."""
        alpha, _, d_alpha, _, det = self._det(t, x_t)
        return (det * noise_pred + d_alpha * x_t) / alpha

    def score_to_velocity(self, score: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Velocity from a score: noise = -sigma score, then `noise_to_velocity` (0 < t < 1)."""
        sigma = self.coefficients(t, x_t)[1]
        return self.noise_to_velocity(-sigma * score, x_t, t)

    def noise_to_x(self, noise_pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """x = (x_t - sigma noise) / alpha (t < 1)."""
        alpha, sigma, _, _ = self.coefficients(t, x_t)
        return (x_t - sigma * noise_pred) / alpha

    def x_to_noise(self, x_pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """noise = (x_t - alpha x) / sigma (t > 0)."""
        alpha, sigma, _, _ = self.coefficients(t, x_t)
        return (x_t - alpha * x_pred) / sigma

    def noise_to_score(self, noise_pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """score = -noise / sigma (t > 0)."""
        return -noise_pred / self.coefficients(t, x_t)[1]

    def score_to_noise(self, score: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """noise = -sigma score."""
        return -self.coefficients(t, x_t)[1] * score

    def time_from_noise_ratio(self, ratio: Tensor) -> Tensor:
        """The t at which sigma_t / alpha_t equals `ratio` (>= 0); used by log-normal time sampling."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(InterpolationPath):
    """Rectified-flow / SiT linear path: alpha = 1 - t, sigma = t, v = noise - x."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def time_from_noise_ratio(self, ratio: Tensor) -> Tensor:
        return ratio / (1 + ratio)


class CosinePath(InterpolationPath):
    """Trigonometric (variance-preserving) path: alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""

    name = "cosine"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(t * (math.pi / 2))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(t * (math.pi / 2))

    def d_alpha(self, t: Tensor) -> Tensor:
        return -(math.pi / 2) * torch.sin(t * (math.pi / 2))

    def d_sigma(self, t: Tensor) -> Tensor:
        return (math.pi / 2) * torch.cos(t * (math.pi / 2))

    def time_from_noise_ratio(self, ratio: Tensor) -> Tensor:
        return (2 / math.pi) * torch.atan(ratio)


PATHS: dict[str, type[InterpolationPath]] = {"linear": LinearPath, "cosine": CosinePath}


def get_path(name: str | InterpolationPath) -> InterpolationPath:
    """The path called `name` ("linear" or "cosine"); a path instance is returned unchanged.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if isinstance(name, InterpolationPath):
        return name
    if name not in PATHS:
        raise ValueError(f"unknown interpolation path {name!r}; choose one of {sorted(PATHS)}")
    return PATHS[name]()
