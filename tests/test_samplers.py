"""Euler/Heun ODE and Euler-Maruyama SDE samplers: golden official runs and exact Gaussian velocity fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repa.samplers import euler_maruyama_sampler, euler_sampler, model_velocity_fn
from repa.transport import get_path

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
TOL = 1e-4
CASE = json.loads((GOLDEN / "case.json").read_text())

# run name -> (sampler, kwargs) as in case.json["sample"]["runs"][name]["call"]
RUNS = {
    "ode_euler_8": ("ode", dict(num_steps=8, heun=False)),
    "ode_heun_8": ("ode", dict(num_steps=8, heun=True)),
    "ode_euler_8_cfg2": ("ode", dict(num_steps=8, heun=False, cfg_scale=2.0)),
    "ode_euler_8_cfg2_hi07": ("ode", dict(num_steps=8, heun=False, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.7)),
    "ode_heun_8_cfg2_hi07": ("ode", dict(num_steps=8, heun=True, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.7)),
    "sde_em_8": ("sde", dict(num_steps=8, path="linear")),
    "sde_em_8_cfg2_hi07": ("sde", dict(num_steps=8, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.7, path="linear")),
}


def _run(fn, ref, name, **extra):
    kind, kwargs = RUNS[name]
    sampler = euler_sampler if kind == "ode" else euler_maruyama_sampler
    return sampler(fn, ref["noise"], ref["y"], null_label=10, **kwargs, **extra)


@pytest.fixture(scope="module")
def golden():
    from repa.models import DiffusionTransformer

    model = DiffusionTransformer(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10,
        class_dropout_prob=0.1, align_depth=2, encoder_dims=[32], projector_dim=128,
    )  # fmt: skip
    model.load_state_dict(load_file(GOLDEN / "model.safetensors"), strict=True)
    return model_velocity_fn(model), load_file(GOLDEN / "sample.safetensors")


@pytest.mark.parametrize("name", list(RUNS))
def test_golden_samples(golden, name):
    fn, ref = golden
    extra = {"eps": ref[f"{name}_eps"]} if name.startswith("sde") else {}
    out = _run(fn, ref, name, **extra)
    assert out.dtype == torch.float64 and out.shape == ref[name].shape
    assert (out - ref[name]).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["sde_em_8", "sde_em_8_cfg2_hi07"])
def test_golden_sde_seeded(golden, name):
    fn, ref = golden
    torch.manual_seed(4321)  # case.json: seeded immediately before each SDE call
    out = _run(fn, ref, name)
    assert (out - ref[name]).abs().max().item() <= TOL
    g = torch.Generator().manual_seed(4321)  # an explicit generator gives the same draws on CPU
    assert (_run(fn, ref, name, generator=g) - ref[name]).abs().max().item() <= TOL


def test_golden_time_grids():
    ref = load_file(GOLDEN / "sample.safetensors")
    torch.testing.assert_close(ref["t_steps_ode"], torch.linspace(1, 0, 9, dtype=torch.float64))
    sde = torch.cat([torch.linspace(1, 0.04, 8, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(ref["t_steps_sde"], sde)


@pytest.mark.parametrize("name", list(RUNS))
def test_model_call_pattern(name):
    """Every model call's (t_cur, batch, number of null labels) equals the recorded official one."""
    calls = []

    def fn(x, t, y):
        assert x.dtype == torch.float32 and t.dtype == torch.float32 and t.shape == (x.shape[0],)
        assert bool((t == t[0]).all())
        calls.append([round(t[0].item(), 6), x.shape[0], int((y == 10).sum())])
        return -x

    ref = {"noise": torch.randn(4, 4, 8, 8), "y": torch.arange(4)}
    _run(fn, ref, name, **({"generator": torch.Generator().manual_seed(0)} if name.startswith("sde") else {}))
    expected = CASE["sample"]["runs"][name]["model_calls_[t_cur,batch,n_null]"]
    assert len(calls) == len(expected)
    for got, want in zip(calls, expected):
        assert got[1:] == want[1:] and got[0] == pytest.approx(want[0], abs=1e-6)


# ------------------------------------------------------------------------------------ exact Gaussian fields

MU, S = 1.5, 0.5  # data N(MU, S^2)


def _gaussian_velocity(path_name: str):
    """v*(x_t, t) = E[v | x_t] for data N(MU, S^2): with x_t = a x + b noise, V = a^2 S^2 + b^2,
    E[x | x_t] = MU + a S^2 (x_t - a MU) / V, E[noise | x_t] = b (x_t - a MU) / V, v* = a' E[x|x_t] + b' E[noise|x_t].
    The ODE dx = v* dt carries N(0, 1) at t = 1 exactly to N(MU, S^2) at t = 0."""
    path = get_path(path_name)

    def fn(x, t, y):
        t = t.double().view(-1, *([1] * (x.ndim - 1)))
        x = x.double()
        a, b, da, db = path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)
        var = a * a * S * S + b * b
        return (da * (MU + a * S * S / var * (x - a * MU)) + db * b / var * (x - a * MU)).float()

    return fn


def _affine_map(fn, **kwargs):
    """The ODE samplers map noise affinely for an affine field: sample(noise) = A noise + B; returns (B, |A|)."""
    out = euler_sampler(fn, torch.tensor([[0.0], [1.0]]), torch.zeros(2, dtype=torch.long), **kwargs)
    return out[0].item(), abs(out[1].item() - out[0].item())


def test_euler_and_heun_recover_gaussian_deterministically():
    fn = _gaussian_velocity("linear")
    mean50, std50 = _affine_map(fn, num_steps=50)
    mean100, std100 = _affine_map(fn, num_steps=100)
    # the mean path is exactly linear in t on the linear path (E[v] = -MU constant): Euler is exact up to round-off
    assert abs(mean50 - MU) < 1e-6
    # Euler is first order: std error ~ 0.015 at 50 steps, and halves with twice the steps
    assert abs(std50 - S) < 0.02
    assert abs(std100 - S) == pytest.approx(abs(std50 - S) / 2, rel=0.1)
    mean_h, std_h = _affine_map(fn, num_steps=50, heun=True)
    assert abs(mean_h - MU) < 1e-6 and abs(std_h - S) < 1e-3  # second order: ~3e-4
    # a custom grid: the uniform one reproduces num_steps exactly; a non-uniform one is as accurate (first order)
    assert _affine_map(fn, t_steps=torch.linspace(1, 0, 51, dtype=torch.float64)) == (mean50, std50)
    mean_sq, std_sq = _affine_map(fn, t_steps=torch.linspace(1, 0, 51, dtype=torch.float64) ** 2)
    assert abs(mean_sq - MU) < 1e-6 and abs(std_sq - S) < 0.02
    with pytest.raises(ValueError, match="strictly decreasing"):
        euler_sampler(fn, torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), t_steps=[0.0, 1.0])


@pytest.mark.parametrize("path_name", ["linear", "cosine"])
def test_samplers_recover_gaussian_statistically(path_name):
    fn = _gaussian_velocity(path_name)
    n = 20000
    g = torch.Generator().manual_seed(0)
    noise, y = torch.randn(n, 1, generator=g), torch.zeros(n, dtype=torch.long)
    # Standard errors: mean S / sqrt(n) = 0.0035, std S / sqrt(2n) = 0.0025; discretisation bias measured at
    # <= 0.018 (cosine Euler mean) / <= 0.008 (SDE: the deterministic last step from t = 0.04). Bound 0.03.
    for out in [
        euler_sampler(fn, noise, y, num_steps=50),
        euler_sampler(fn, noise, y, num_steps=25, heun=True),
        euler_maruyama_sampler(fn, noise, y, num_steps=100, path=path_name, generator=g),
    ]:
        assert abs(out.mean().item() - MU) < 0.03
        assert abs(out.std().item() - S) < 0.03


def test_sde_wrong_path_is_detected():
    """The SDE uses the path for the score: sampling a cosine-trained field as linear gives wrong moments."""
    fn = _gaussian_velocity("cosine")
    n = 20000
    g = torch.Generator().manual_seed(1)
    noise, y = torch.randn(n, 1, generator=g), torch.zeros(n, dtype=torch.long)
    out = euler_maruyama_sampler(fn, noise, y, num_steps=100, path="linear", generator=g)
    assert abs(out.std().item() - S) > 0.1 or abs(out.mean().item() - MU) > 0.1


def test_sde_injected_eps_equals_generator_and_last_step_deterministic():
    fn = _gaussian_velocity("linear")
    noise, y = torch.randn(3, 2), torch.zeros(3, dtype=torch.long)
    a = euler_maruyama_sampler(fn, noise, y, num_steps=5, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    eps = torch.stack([torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(4)])  # one draw per step
    torch.testing.assert_close(a, euler_maruyama_sampler(fn, noise, y, num_steps=5, eps=eps), atol=0, rtol=0)
    with pytest.raises(ValueError, match="4 are needed"):
        euler_maruyama_sampler(fn, noise, y, num_steps=5, eps=eps[:3])
    with pytest.raises(ValueError, match="num_steps >= 2"):
        euler_maruyama_sampler(fn, noise, y, num_steps=1)


def test_cfg_arithmetic_and_errors():
    def fn(x, t, y):  # conditional velocity 1, unconditional 0
        return torch.where((y == 10).view(-1, 1), 0.0, 1.0).expand_as(x).clone()

    noise, y = torch.zeros(2, 3), torch.tensor([0, 1])
    out = euler_sampler(fn, noise, y, num_steps=4, cfg_scale=3.0, null_label=10)
    torch.testing.assert_close(out, torch.full((2, 3), -3.0, dtype=torch.float64))  # x = 0 - 1 * 3
    half = euler_sampler(fn, noise, y, num_steps=4, cfg_scale=3.0, null_label=10, guidance_high=0.5)
    torch.testing.assert_close(half, torch.full((2, 3), -2.0, dtype=torch.float64))  # guided on t_cur 0.5, 0.25
    with pytest.raises(ValueError, match="null_label"):
        euler_sampler(fn, noise, y, cfg_scale=2.0)
    with pytest.raises(ValueError, match="null_label"):
        euler_maruyama_sampler(fn, noise, y, cfg_scale=2.0)


def test_model_velocity_fn_adapter():
    class Fake(torch.nn.Module):
        def forward(self, x, t, y, *, force_drop_ids=None, project=True):
            assert project is False and not self.training
            return torch.cat([x * 2, x * 5], 1), []

    model = Fake().train()
    fn = model_velocity_fn(model)
    x = torch.ones(2, 3, 4, 4)
    torch.testing.assert_close(fn(x, torch.zeros(2), torch.zeros(2, dtype=torch.long)), x * 2)  # learned Sigma dropped
    assert not model.training


# ------------------------------------------------------------------------------------ dopri5 (adaptive, torchdiffeq)


def test_dopri5_recovers_gaussian_deterministically():
    pytest.importorskip("torchdiffeq")
    from repa.samplers import dopri5_sampler

    noise, y = torch.tensor([[0.0], [1.0]]), torch.zeros(2, dtype=torch.long)
    for path_name in ("linear", "cosine"):
        fn = _gaussian_velocity(path_name)
        loose, tight = {}, {}
        out = dopri5_sampler(fn, noise, y, stats=loose)  # SiT's defaults: atol 1e-6, rtol 1e-3
        mean, std = out[0].item(), abs(out[1].item() - out[0].item())
        # measured: |mean - MU| <= 1.4e-3 (cosine), |std - S| <= 8e-3 at rtol 1e-3
        assert abs(mean - MU) < 5e-3 and abs(std - S) < 2e-2
        out = dopri5_sampler(fn, noise, y, atol=1e-9, rtol=1e-9, stats=tight)
        mean, std = out[0].item(), abs(out[1].item() - out[0].item())
        # the model is evaluated in float32 (as every sampler): ~1e-6 round-off remains
        assert abs(mean - MU) < 1e-5 and abs(std - S) < 1e-5
        assert tight["nfe"] > loose["nfe"] > 6  # adaptive: tighter tolerances take more evaluations


@pytest.mark.parametrize("path_name", ["linear", "cosine"])
def test_dopri5_recovers_gaussian_statistically(path_name):
    pytest.importorskip("torchdiffeq")
    from repa.samplers import dopri5_sampler

    n = 20000
    g = torch.Generator().manual_seed(0)
    noise, y = torch.randn(n, 1, generator=g), torch.zeros(n, dtype=torch.long)
    out = dopri5_sampler(_gaussian_velocity(path_name), noise, y)
    assert out.dtype == torch.float64 and out.shape == (n, 1)
    assert abs(out.mean().item() - MU) < 0.015  # SE 0.0035 + solver error at rtol 1e-3
    assert abs(out.std().item() - S) < 0.015  # SE 0.0025


def _smooth_field(x, t, y):
    """A nonlinear, time-dependent, label-dependent velocity field (no closed form)."""
    tt = t.view(-1, *([1] * (x.ndim - 1)))
    yy = y.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return torch.sin(2 * x * tt) - 0.5 * x + 0.3 * tt + 0.1 * yy


def test_dopri5_matches_heun_with_many_steps():
    pytest.importorskip("torchdiffeq")
    from repa.samplers import dopri5_sampler

    g = torch.Generator().manual_seed(0)
    noise, y = torch.randn(8, 2, 4, 4, generator=g), torch.arange(8) % 3
    ref = euler_sampler(_smooth_field, noise, y, num_steps=400, heun=True)
    out = dopri5_sampler(_smooth_field, noise, y, atol=1e-8, rtol=1e-8)
    assert (out - ref).abs().max().item() < 1e-4  # 3.2e-5 measured (Heun is second order)
    # with CFG (label 10 = null) guided for t <= 0.6: a Heun grid with 0.6 as a grid point switches exactly there, as
    # dopri5 does with its jump point (a grid step across an interval end would be off by O(dt))
    kw = dict(cfg_scale=2.5, guidance_low=0.0, guidance_high=0.6, null_label=10)
    upper, lower = torch.linspace(1, 0.6, 161, dtype=torch.float64), torch.linspace(0.6, 0, 241, dtype=torch.float64)
    grid = torch.cat([upper, lower[1:]])
    ref = euler_sampler(_smooth_field, noise, y, t_steps=grid, heun=True, **kw)
    out = dopri5_sampler(_smooth_field, noise, y, atol=1e-8, rtol=1e-8, **kw)
    assert (out - ref).abs().max().item() < 1e-4  # 4.1e-5 measured (3.7e-3 with a grid step across t = 0.6)


def test_dopri5_guidance_interval_is_exact_for_constant_fields():
    pytest.importorskip("torchdiffeq")
    from repa.samplers import dopri5_sampler

    def fn(x, t, y):  # conditional velocity 1, unconditional 0
        return torch.where((y == 10).view(-1, 1), 0.0, 1.0).expand_as(x).clone()

    noise, y = torch.zeros(2, 3), torch.tensor([0, 1])
    out = dopri5_sampler(fn, noise, y, cfg_scale=3.0, null_label=10)
    torch.testing.assert_close(out, torch.full((2, 3), -3.0, dtype=torch.float64))  # guided on all of [0, 1]
    # guided only for t in [0.2, 0.5]: x = -(0.3 * 3 + 0.7 * 1); the ends are solver jump points, so exact
    half = dopri5_sampler(fn, noise, y, cfg_scale=3.0, null_label=10, guidance_low=0.2, guidance_high=0.5)
    torch.testing.assert_close(half, torch.full((2, 3), -1.6, dtype=torch.float64), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="null_label"):
        dopri5_sampler(fn, noise, y, cfg_scale=2.0)
    with pytest.raises(ValueError, match="tolerances must be > 0"):
        dopri5_sampler(fn, noise, y, rtol=0.0)


def test_dopri5_joint_class_token():
    pytest.importorskip("torchdiffeq")
    from repa.samplers import dopri5_sampler

    field = _gaussian_velocity("linear")

    def joint(x, cls, t, y):  # image and class token follow independent exact Gaussian fields
        return field(x, t, y), field(cls, t, y)

    g = torch.Generator().manual_seed(1)
    noise, cls, y = torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 3, generator=g), torch.zeros(4).long()
    x, c = dopri5_sampler(joint, noise, y, cls_noise=cls, return_class_token=True, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(x, MU + S * noise.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(c, MU + S * cls.double(), atol=1e-5, rtol=0)
    assert dopri5_sampler(joint, noise, y, cls_noise=cls).shape == noise.shape  # the class token is dropped


def test_dopri5_without_torchdiffeq_names_the_install(monkeypatch):
    import sys

    from repa.samplers import dopri5_sampler

    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install torchdiffeq"):
        dopri5_sampler(_smooth_field, torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
