"""Interpolation paths, prediction conversions, time sampling and the SiT convention converters."""

from __future__ import annotations

import math

import pytest
import torch

from repa.transport import (
    CosinePath,
    LinearPath,
    expand_t,
    get_path,
    repa_time_to_sit,
    sample_time,
    sit_time_to_repa,
    sit_velocity_fn_to_repa,
    time_from_uniform,
)

PATHS = ["linear", "cosine"]


def _data(b: int = 5, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 4, 4, generator=g, dtype=dtype)
    noise = torch.randn(b, 3, 4, 4, generator=g, dtype=dtype)
    return x, noise, g


@pytest.mark.parametrize("name", PATHS)
def test_boundaries(name):
    path = get_path(name)
    x, noise, _ = _data(dtype=torch.float32)
    b = x.shape[0]
    torch.testing.assert_close(path.interpolate(x, noise, torch.zeros(b)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(path.interpolate(x, noise, torch.ones(b)), noise, atol=1e-6, rtol=0)
    # scalar times broadcast too
    torch.testing.assert_close(path.interpolate(x, noise, 0.0), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", PATHS)
def test_velocity_target_is_time_derivative(name):
    path = get_path(name)
    x, noise, g = _data()
    t = torch.rand(x.shape[0], generator=g, dtype=torch.float64)
    # per-sample t: a forward-mode JVP with tangent 1 gives d x_t / dt elementwise
    _, dxdt = torch.func.jvp(lambda tt: path.interpolate(x, noise, tt), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(path.velocity_target(x, noise, t), dxdt, atol=1e-12, rtol=1e-12)
    # schedule derivatives themselves
    for f, df in [(path.alpha, path.d_alpha), (path.sigma, path.d_sigma)]:
        _, d = torch.func.jvp(f, (t,), (torch.ones_like(t),))
        torch.testing.assert_close(df(t), d, atol=1e-12, rtol=1e-12)


def test_linear_velocity_is_noise_minus_x():
    x, noise, _ = _data()
    t = torch.full((x.shape[0],), 0.3, dtype=torch.float64)
    torch.testing.assert_close(LinearPath().velocity_target(x, noise, t), noise - x)


@pytest.mark.parametrize("name", PATHS)
def test_conversions_round_trip(name):
    path = get_path(name)
    x, noise, g = _data()
    t = 0.05 + 0.9 * torch.rand(x.shape[0], generator=g, dtype=torch.float64)
    x_t = path.interpolate(x, noise, t)
    v = path.velocity_target(x, noise, t)
    sigma = path.sigma(expand_t(t, x))
    score = -noise / sigma  # the conditional score grad log N(x_t; alpha x, sigma^2)
    close = dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(path.velocity_to_x(v, x_t, t), x, **close)
    torch.testing.assert_close(path.velocity_to_noise(v, x_t, t), noise, **close)
    torch.testing.assert_close(path.velocity_to_score(v, x_t, t), score, **close)
    torch.testing.assert_close(path.x_to_velocity(x, x_t, t), v, **close)
    torch.testing.assert_close(path.noise_to_velocity(noise, x_t, t), v, **close)
    torch.testing.assert_close(path.score_to_velocity(score, x_t, t), v, **close)
    torch.testing.assert_close(path.noise_to_x(noise, x_t, t), x, **close)
    torch.testing.assert_close(path.x_to_noise(x, x_t, t), noise, **close)
    torch.testing.assert_close(path.noise_to_score(noise, x_t, t), score, **close)
    torch.testing.assert_close(path.score_to_noise(score, x_t, t), noise, **close)


@pytest.mark.parametrize("name", PATHS)
def test_score_equals_official_formula(name):
    """REPA's get_score_from_velocity: r = alpha / d_alpha, var = sigma^2 - r d_sigma sigma, s = (r v - x_t) / var."""
    path = get_path(name)
    x, noise, g = _data()
    t = 0.05 + 0.9 * torch.rand(x.shape[0], generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)  # any velocity, not just the true one
    x_t = path.interpolate(x, noise, t)
    a, s, da, ds = path.coefficients(t, x)
    r = a / da
    official = (r * v - x_t) / (s**2 - r * ds * s)
    torch.testing.assert_close(path.velocity_to_score(v, x_t, t), official, atol=1e-10, rtol=1e-10)


def test_get_path_errors_and_instances():
    assert isinstance(get_path("linear"), LinearPath)
    assert isinstance(get_path("cosine"), CosinePath)
    p = CosinePath()
    assert get_path(p) is p
    with pytest.raises(ValueError, match="unknown interpolation path 'vp'.*cosine.*linear"):
        get_path("vp")


def test_expand_t_shapes():
    x = torch.zeros(3, 2, 4, 4)
    assert expand_t(torch.rand(3), x).shape == (3, 1, 1, 1)
    assert expand_t(0.5, x).ndim == 0
    assert expand_t(torch.tensor(0.5), x).ndim == 0
    with pytest.raises(ValueError, match="does not broadcast"):
        expand_t(torch.rand(4), x)


def test_sample_time_uniform_replays_official_draw():
    torch.manual_seed(7)
    ours = sample_time(6, "uniform", device="cpu")
    torch.manual_seed(7)
    official = torch.rand((6, 1, 1, 1))  # SILoss(weighting="uniform")
    torch.testing.assert_close(ours, official.flatten(), atol=0, rtol=0)
    assert ours.dtype == torch.float32 and ours.shape == (6,)


@pytest.mark.parametrize("name", PATHS)
def test_sample_time_lognormal_matches_official(name):
    torch.manual_seed(3)
    ours = sample_time(64, "lognormal", device="cpu", path=name)
    torch.manual_seed(3)
    sigma = torch.randn((64, 1, 1, 1)).exp()  # SILoss(weighting="lognormal")
    official = sigma / (1 + sigma) if name == "linear" else 2 / math.pi * torch.atan(sigma)
    torch.testing.assert_close(ours, official.flatten(), atol=1e-6, rtol=0)
    assert bool(((ours > 0) & (ours < 1)).all())


def test_sample_time_generator_and_errors():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(sample_time(5, "lognormal", generator=g1), sample_time(5, "lognormal", generator=g2))
    with pytest.raises(ValueError, match="unknown time sampling"):
        sample_time(3, "beta")


def test_time_from_uniform():
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert time_from_uniform(u, "uniform") is u
    n = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    u = torch.special.ndtr(n)
    torch.testing.assert_close(time_from_uniform(u, "lognormal"), torch.sigmoid(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(time_from_uniform(u, "lognormal", mean=-0.4, std=1.2), torch.sigmoid(-0.4 + 1.2 * n),
                               atol=1e-5, rtol=0)  # fmt: skip
    extremes = time_from_uniform(torch.tensor([0.0, 1.0]), "lognormal")
    assert bool(torch.isfinite(extremes).all()) and bool(((extremes > 0) & (extremes < 1)).all())


def test_sit_convention_converters():
    x, noise, g = _data()
    t = torch.rand(x.shape[0], generator=g, dtype=torch.float64)
    t_sit = repa_time_to_sit(t)
    torch.testing.assert_close(sit_time_to_repa(t_sit), t)
    ts = expand_t(t_sit, x)
    x_t_sit = ts * x + (1 - ts) * noise  # SiT: t_sit = 1 is data

    def fn_sit(x_t, tt, y):  # SiT's velocity d x_t / d t_sit = x - noise for this (x, noise) pair
        assert torch.equal(x_t, x_t_sit)
        torch.testing.assert_close(tt, t_sit)
        return x - noise

    path = LinearPath()
    torch.testing.assert_close(path.interpolate(x, noise, t), x_t_sit)
    v = sit_velocity_fn_to_repa(fn_sit)(x_t_sit, t, None)
    torch.testing.assert_close(v, path.velocity_target(x, noise, t))
