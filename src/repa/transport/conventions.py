"""Converters to and from SiT's reversed time convention; for checkpoint/model boundaries only.

SiT's own code (github.com/willisma/SiT) runs time the other way: t_sit = 0 is noise, t_sit = 1 is data,
x_t = t_sit x + (1 - t_sit) noise and its velocity is d x_t / d t_sit = x - noise. With REPA's convention
(t = 0 data, t = 1 noise, v = noise - x on the linear path) that is t_sit = 1 - t and v_sit = -v.
A public SiT checkpoint therefore gives a REPA velocity field as v(x, t, y) = -model_sit(x, 1 - t, y).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = [
    "repa_time_to_sit",
    "repa_velocity_to_sit",
    "sit_time_to_repa",
    "sit_velocity_fn_to_repa",
    "sit_velocity_to_repa",
]


def sit_time_to_repa(t_sit: Tensor) -> Tensor:
    """t = 1 - t_sit."""
    return 1 - t_sit


def repa_time_to_sit(t: Tensor) -> Tensor:
    """t_sit = 1 - t."""
    return 1 - t


def sit_velocity_to_repa(v_sit: Tensor) -> Tensor:
    """v = -v_sit (time runs the other way, so d x_t / dt changes sign)."""
    return -v_sit


def repa_velocity_to_sit(v: Tensor) -> Tensor:
    """v_sit = -v."""
    return -v


def sit_velocity_fn_to_repa(
    fn_sit: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Wrap a velocity function in SiT's convention, `fn_sit(x_t, t_sit, y) -> v_sit`, into REPA's.

    Args:
        fn_sit: e.g. `lambda x, t, y: sit_model(x, t, y)` for an official SiT checkpoint.

    Returns:
        `fn(x_t, t, y) -> v` usable by `repa.samplers`.
    """

    def fn(x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return sit_velocity_to_repa(fn_sit(x_t, repa_time_to_sit(t), y))

    return fn
