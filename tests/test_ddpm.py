"""DiT's discrete diffusion: schedule, q_sample, posterior, L_vlb, respacing, CFG and ancestral sampling."""

from __future__ import annotations

import math

import pytest
import torch

from repa.transport.ddpm import (
    GaussianDiffusion,
    cfg_eps_fn,
    create_diffusion,
    linear_beta_schedule,
    space_timesteps,
)

MU, S = 0.7, 0.4  # Gaussian data N(MU, S^2) per dimension


def test_linear_beta_schedule():
    betas = linear_beta_schedule(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    b500 = linear_beta_schedule(500)  # DiT's get_named_beta_schedule scales by 1000 / T
    assert b500[0].item() == pytest.approx(2e-4) and b500[-1].item() == pytest.approx(0.04)
    d = create_diffusion()
    assert d.num_timesteps == 1000
    # abar_T ~ 4e-5: the last step is essentially pure noise
    assert 1e-5 < d.alphas_cumprod[-1].item() < 1e-4


def test_q_sample_moments():
    d = create_diffusion()
    n = 20000
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 1), 1.3)
    for i in [0, 250, 999]:
        timestep = torch.full((n,), i, dtype=torch.long)
        x_t = d.q_sample(x, timestep, torch.randn(n, 1, generator=g))
        abar = d.alphas_cumprod[i].item()
        se = math.sqrt((1 - abar) / n)
        # 5 standard errors: a false failure has probability ~1e-6 (fixed seed anyway)
        assert abs(x_t.mean().item() - math.sqrt(abar) * 1.3) < 5 * se
        assert abs(x_t.std().item() - math.sqrt(1 - abar)) < 5 * math.sqrt((1 - abar) / (2 * n))
    mean, var, logvar = d.q_mean_variance(x[:2], torch.tensor([10, 10]))
    torch.testing.assert_close(var, torch.full_like(var, 1 - d.alphas_cumprod[10].item()))
    torch.testing.assert_close(logvar, var.log())


def test_posterior_matches_bayes():
    """q(x_{t-1} | x_t, x) by conditioning x_{t-1} ~ N(sqrt(abar_{t-1}) x, 1 - abar_{t-1}) on
    x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t): precision 1/(1-abar_{t-1}) + alpha_t/beta_t."""
    d = create_diffusion()
    ts = torch.tensor([1, 2, 17, 500, 999])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    mean, var, logvar = d.q_posterior_mean_variance(x, x_t, ts)
    abar_prev = d.alphas_cumprod_prev[ts].view(-1, 1, 1, 1)
    beta = d.betas[ts].view(-1, 1, 1, 1)
    prec = 1 / (1 - abar_prev) + (1 - beta) / beta
    var_bayes = 1 / prec
    mean_bayes = var_bayes * (abar_prev.sqrt() * x / (1 - abar_prev) + (1 - beta).sqrt() * x_t / beta)
    torch.testing.assert_close(mean, mean_bayes, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(var.expand_as(mean), var_bayes.expand_as(mean), atol=1e-14, rtol=1e-8)
    torch.testing.assert_close(logvar, var.log())
    # step 0: the posterior variance is 0; the log is clipped to step 1's value
    assert d.posterior_variance[0].item() == 0.0
    assert d.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(d.posterior_variance[1].item()))


def test_vlb_of_perfect_model_and_stop_grad():
    d = create_diffusion()
    g = torch.Generator().manual_seed(2)
    b = 6
    x = torch.rand(b, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(b, 2, 4, 4, generator=g)
    timestep = torch.tensor([0, 1, 5, 100, 600, 999])
    x_t = d.q_sample(x, timestep, noise)
    # eps = the true noise (so the x prediction is exact) and v = -1 (variance = beta_tilde, the true posterior's)
    v = torch.full_like(x, -1.0, requires_grad=True)
    eps = noise.clone().requires_grad_(True)
    terms = d.training_losses(torch.cat([eps, v], 1), x, x_t, timestep, noise)
    assert terms["loss"].shape == (b,)
    assert terms["mse"].abs().max().item() < 1e-10
    assert terms["vb"][1:].abs().max().item() < 1e-3  # KL terms ~ 0 (float32 round-off in the means only)
    nll0 = terms["vb"][0].item()  # decoder NLL at step 0: finite, a few bits at most (bin 2/255 vs sigma ~ 0.007)
    assert 0 < nll0 < 8
    # stop-grad: L_vlb does not reach the eps channels, only v; L_simple reaches eps
    (grad_eps,) = torch.autograd.grad(terms["vb"].sum(), eps, retain_graph=True)
    assert grad_eps.abs().max().item() == 0.0
    (grad_v,) = torch.autograd.grad(terms["vb"][1:].sum() + 0.1 * (v**2).sum(), v, retain_graph=True)
    assert grad_v.abs().max().item() > 0
    # a wrong mean costs KL > 0 at every step; a wrong variance matters where beta and beta_tilde differ (small t)
    wrong_mean = d.training_losses(torch.cat([noise + 0.1, v.detach()], 1), x, x_t, timestep, noise)
    assert bool((wrong_mean["vb"][1:] > terms["vb"][1:]).all())
    wrong_var = d.training_losses(torch.cat([noise, torch.ones_like(x)], 1), x, x_t, timestep, noise)
    assert bool((wrong_var["vb"][1:3] > terms["vb"][1:3] + 1e-5).all())


def test_space_timesteps():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and min(kept) == 0 and max(kept) == 999
    assert space_timesteps(1000, 250) == kept == space_timesteps(1000, [250])
    sections = space_timesteps(100, "10,5")  # two sections of 50 steps
    assert len(sections) == 15 and sections >= {0, 49, 50, 99}
    assert space_timesteps(10, "10") == set(range(10))
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(100, "60,10")


def test_respacing_keeps_alphas_cumprod():
    base = create_diffusion()
    for spacing in ["250", 25, "10,20"]:
        d = create_diffusion(spacing)
        kept = sorted(space_timesteps(1000, spacing))
        assert d.timestep_map.tolist() == kept
        torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[kept], atol=1e-15, rtol=1e-12)
        # the model always sees the ORIGINAL index, as a float (DiT feeds 0..999 to its timestep embedder)
        idx = torch.tensor([0, d.num_timesteps - 1])
        assert d.model_time(idx).tolist() == [float(kept[0]), float(kept[-1])]
        assert d.model_time(idx).dtype == torch.float32


def _exact_output(d: GaussianDiffusion, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """eps = E[noise | x_t] and the v giving the exact reverse variance beta_tilde + coef1^2 Var[x | x_t]
    for data N(MU, S^2): with both, each ancestral step is the true Gaussian reverse conditional."""
    x_t = x_t.double()
    abar = d.alphas_cumprod[timestep].view(-1, *([1] * (x_t.ndim - 1)))
    a, b = abar.sqrt(), (1 - abar).sqrt()
    var_t = a * a * S * S + b * b
    ex = MU + a * S * S / var_t * (x_t - a * MU)
    eps = (x_t - a * ex) / b
    var_x = S * S * b * b / var_t
    c1 = d.posterior_mean_coef1[timestep].view_as(abar)
    true_var = d.posterior_variance[timestep].view_as(abar) + c1 * c1 * var_x
    lo = d.posterior_log_variance_clipped[timestep].view_as(abar)
    hi = d.betas[timestep].log().view_as(abar)
    frac = ((true_var.log() - lo) / (hi - lo)).expand_as(x_t)
    frac = torch.where((timestep == 0).view_as(abar).expand_as(x_t), torch.zeros_like(frac), frac)
    return torch.cat([eps, 2 * frac - 1], dim=1)


def test_sampling_exact_model_recovers_gaussian():
    d = create_diffusion("100")
    n = 20000
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    idx_of = {float(orig): i for i, orig in enumerate(d.timestep_map.tolist())}

    def fn(x_t, t_model, y):
        timestep = torch.tensor([idx_of[v] for v in t_model.tolist()[:1]]).expand(x_t.shape[0])
        return _exact_output(d, x_t, timestep)

    out = d.p_sample_loop(fn, noise, torch.zeros(n, dtype=torch.long), generator=torch.Generator().manual_seed(4))
    # Exact chain for Gaussian data: only sampling error remains (SE of mean 0.0028, of std 0.002) and the
    # final x prediction at step 0 (Var[x | x_0] ~ 1e-4 S^2). 5 SE bounds.
    assert abs(out.mean().item() - MU) < 5 * S / math.sqrt(n)
    assert abs(out.std().item() - S) < 5 * S / math.sqrt(2 * n)


def test_p_sample_loop_injected_eps_replays_generator():
    d = create_diffusion("5")
    noise = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    fn = lambda x_t, t, y: torch.cat([0.1 * x_t, torch.zeros_like(x_t)], 1)  # noqa: E731
    a = d.p_sample_loop(fn, noise, torch.zeros(3, dtype=torch.long), generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    eps = [torch.randn(noise.shape, generator=g) for _ in range(4)]
    b = d.p_sample_loop(fn, noise, torch.zeros(3, dtype=torch.long), eps=eps)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_cfg_eps_fn():
    calls = []

    def fn(x_t, t, y):
        calls.append((x_t.shape[0], y.tolist()))
        cond = (y < 10).float().view(-1, 1, 1, 1)
        eps = x_t + cond  # cond: x + 1, uncond: x
        return torch.cat([eps, torch.full_like(x_t, 0.5) * (1 + cond)], 1)

    x = torch.zeros(2, 4, 2, 2)
    out = cfg_eps_fn(fn, 3.0, null_label=10)(x, torch.tensor([5.0, 5.0]), torch.tensor([1, 2]))
    assert calls == [(4, [1, 2, 10, 10])]
    assert out.shape == (2, 8, 2, 2)
    torch.testing.assert_close(out[:, :4], torch.full_like(x, 3.0))  # 0 + 3 (1 - 0)
    torch.testing.assert_close(out[:, 4:], torch.full_like(x, 1.0))  # conditional variance channels
    dit = cfg_eps_fn(fn, 3.0, null_label=10, guidance_channels=3)(x, torch.tensor([5.0, 5.0]), torch.tensor([1, 2]))
    torch.testing.assert_close(dit[:, :3], torch.full_like(x[:, :3], 3.0))
    torch.testing.assert_close(dit[:, 3], torch.full_like(x[:, 3], 1.0))  # DiT's unguided 4th channel (cond)


def test_learn_sigma_false_and_errors():
    d = create_diffusion(learn_sigma=False)
    x = torch.zeros(2, 3, 2, 2)
    out = d.p_mean_variance(torch.zeros_like(x), x, torch.tensor([3, 3]))
    torch.testing.assert_close(out["variance"][0, 0, 0, 0].double(), d.posterior_variance[3], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="must output 6 channels"):
        create_diffusion().p_mean_variance(torch.zeros_like(x), x, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.0, 0.1]))


def test_dit_end_to_end_loss_and_sampling():
    """A tiny learned-Sigma DiffusionTransformer: RepaLoss(diffusion="ddpm") backpropagates to every part, and
    respaced CFG sampling runs with the model seeing original timesteps 0..999 as floats."""
    from repa.losses import RepaLoss
    from repa.models import DiffusionTransformer
    from repa.transport import ddpm_model_fn

    torch.manual_seed(0)
    model = DiffusionTransformer(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                 num_classes=10, learn_sigma=True, align_depth=1, encoder_dims=[16], projector_dim=32)  # fmt: skip
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = RepaLoss(diffusion="ddpm")(
            model, x, y, [torch.randn(3, 16, 16)], generator=torch.Generator().manual_seed(1)
        )
    assert {"denoise", "mse", "vb", "align", "align/0", "total"} <= set(terms)
    assert all(bool(torch.isfinite(v)) and v.dtype == torch.float32 for v in terms.values())
    terms["total"].backward()
    assert model.final_layer.linear.weight.grad is not None and model.projectors[0][0].weight.grad is not None

    seen = []
    base = ddpm_model_fn(model.eval())

    def fn(x_t, t_model, y_):
        seen.append(t_model[0].item())
        return base(x_t, t_model, y_)

    d = create_diffusion("4")
    out = d.p_sample_loop(cfg_eps_fn(fn, 1.5, null_label=10), torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))
    assert out.shape == (2, 4, 8, 8) and bool(torch.isfinite(out).all())
    assert seen == [999.0, 666.0, 333.0, 0.0]


def test_linear_time_of_step_inverts_linear_to_ddpm():
    """The noise level of a DDPM step in REPA time is the t that `linear_to_ddpm` maps to that step."""
    from repa.convert import linear_to_ddpm
    from repa.transport.ddpm import linear_time_of_step

    steps = torch.tensor([0.0, 10.0, 250.0, 500.0, 900.0, 999.0])
    t = linear_time_of_step(steps)
    assert t.shape == (6,) and bool((t[1:] > t[:-1]).all()) and 0 < float(t[0]) < float(t[-1]) < 1
    _, back = linear_to_ddpm(torch.zeros(6, 1), t.double())
    torch.testing.assert_close(back, steps, atol=0.02, rtol=0)


def test_ddpm_guidance_interval_guides_only_inside_it():
    """DDPM sampling applies classifier-free guidance only at steps whose noise level (REPA time) lies in
    [guidance_low, guidance_high]; outside it the conditional model runs alone (one batch, not two)."""
    from repa.transport.ddpm import linear_time_of_step

    calls = []

    def fn(x, t_model, y):
        calls.append((float(t_model[0]), len(x)))
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)

    d = create_diffusion("20")
    d.p_sample_loop(cfg_eps_fn(fn, 2.0, null_label=10, guidance_low=0.2, guidance_high=0.7), torch.randn(2, 4, 4, 4),
                    torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert len(calls) == 20
    for step, batch in calls:
        t = float(linear_time_of_step(torch.tensor([step]))[0])
        assert batch == (4 if 0.2 <= t <= 0.7 else 2), (step, t, batch)
    assert {b for _, b in calls} == {2, 4}  # both kinds of step occur
    calls.clear()  # the full interval guides every step, as before the interval existed
    d.p_sample_loop(cfg_eps_fn(fn, 2.0, null_label=10), torch.randn(2, 4, 4, 4), torch.tensor([0, 1]))
    assert all(b == 4 for _, b in calls)


def test_repa_sampling_of_a_ddpm_model_honours_the_guidance_interval():
    """The same through `repa.generate` (what `repa sample` and `repa eval generate` run) on a learned-sigma DiT:
    the model sees the doubled (guided) batch only inside [guidance_low, guidance_high]."""
    from repa.config import from_dict
    from repa.generate import generate
    from repa.models import DiffusionTransformer

    torch.manual_seed(0)
    model = DiffusionTransformer(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                 num_classes=5, learn_sigma=True)  # fmt: skip
    batches: list[int] = []
    model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    labels = torch.tensor([0, 3])
    for low, high, kinds in ((0.2, 0.7, {2, 4}), (0.0, 1.0, {4})):
        cfg = from_dict({"transport": {"diffusion": "ddpm"},
                         "sample": {"num_steps": 20, "cfg_scale": 2.0, "guidance_low": low, "guidance_high": high}})  # fmt: skip
        batches.clear()
        x = generate(model, cfg, labels, (4, 8, 8), seed=0)
        assert x.shape == (2, 4, 8, 8) and len(batches) == 20
        assert set(batches) == kinds, (low, high, batches)


# ------------------------------------------------------------------------------------------------------ DDIM


def _exact_eps_fn(d: GaussianDiffusion):
    """fn(x_t, t_model, y) -> (B, C) eps = E[noise | x_t] for data N(MU, S^2) (no variance channels)."""
    idx_of = {float(orig): i for i, orig in enumerate(d.timestep_map.tolist())}

    def fn(x_t, t_model, y):
        timestep = torch.tensor([idx_of[v] for v in t_model.tolist()[:1]]).expand(x_t.shape[0])
        return _exact_output(d, x_t, timestep)[:, : x_t.shape[1]]

    return fn


def test_ddim_eta0_is_deterministic_given_the_noise():
    d = create_diffusion("20", learn_sigma=False)
    noise = torch.randn(6, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    torch.manual_seed(1)
    a = d.ddim_sample_loop(_exact_eps_fn(d), noise, y)
    state = torch.random.get_rng_state()
    b = d.ddim_sample_loop(_exact_eps_fn(d), noise, y, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # no draw at eta = 0: neither RNG matters
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG was not touched
    # DDIM discretises the probability-flow ODE, which maps noise to MU + S noise for Gaussian data (up to the
    # ~4e-5 signal left at step 999); first order: max error 0.23 / 0.093 / 0.023 measured at 20 / 50 / 200 steps
    ref = MU + S * noise
    errors = []
    for spacing in ("50", "200"):
        fine = create_diffusion(spacing, learn_sigma=False)
        errors.append((fine.ddim_sample_loop(_exact_eps_fn(fine), noise, y) - ref).abs().max().item())
    assert errors[1] < 0.03 and errors[1] < errors[0] / 3 < (a - ref).abs().max().item() / 3


def test_ddim_eta1_step_is_the_ancestral_posterior():
    """eta = 1: sigma^2 = beta_tilde (the posterior variance) and the mean is DDPM's posterior mean, so one DDIM step
    equals one ancestral step with the fixed small variance, draw for draw."""
    for spacing in (None, "50"):
        d = create_diffusion(spacing, learn_sigma=False)
        g = torch.Generator().manual_seed(2)
        b = 5
        ts = torch.tensor([1, 2, 7, d.num_timesteps // 2, d.num_timesteps - 1])
        x_t = torch.randn(b, 2, 3, 3, generator=g, dtype=torch.float64)
        eps = torch.randn(b, 2, 3, 3, generator=g, dtype=torch.float64)
        z = torch.randn(b, 2, 3, 3, generator=g, dtype=torch.float64)
        ddim = d.ddim_sample(eps, x_t, ts, z, eta=1.0)
        ancestral = d.p_sample(eps, x_t, ts, z)
        torch.testing.assert_close(ddim, ancestral, atol=1e-10, rtol=1e-8)
        half = d.ddim_sample(eps, x_t, ts, z, eta=0.5)
        det = d.ddim_sample(eps, x_t, ts, None, eta=0.0)
        assert not torch.allclose(half, ancestral) and not torch.allclose(det, ancestral)
    # the whole chain, with the same injected noises: DDIM(eta = 1) == ancestral sampling
    d = create_diffusion("10", learn_sigma=False)
    noise = torch.randn(4, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    zs = torch.randn(9, 4, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    fn = _exact_eps_fn(d)
    torch.testing.assert_close(d.ddim_sample_loop(fn, noise, y, eta=1.0, eps=zs), d.p_sample_loop(fn, noise, y, eps=zs),
                               atol=1e-10, rtol=1e-8)  # fmt: skip


def test_ddim_eta1_matches_ancestral_in_distribution():
    """On a toy eps model (exact for Gaussian data), DDIM with eta = 1 and ancestral sampling with beta_tilde draw
    from the same distribution; eta = 0 lands on the data distribution too."""
    d = create_diffusion("25", learn_sigma=False)
    n = 8000
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    fn = _exact_eps_fn(d)
    ddim = d.ddim_sample_loop(fn, noise, y, eta=1.0, generator=torch.Generator().manual_seed(4))
    anc = d.p_sample_loop(fn, noise, y, generator=torch.Generator().manual_seed(5))  # independent draws
    se_mean, se_std = S / math.sqrt(n), S / math.sqrt(2 * n)
    assert abs(ddim.mean().item() - anc.mean().item()) < 5 * math.sqrt(2) * se_mean
    assert abs(ddim.std().item() - anc.std().item()) < 5 * math.sqrt(2) * se_std
    # both use beta_tilde, below the true reverse variance (beta_tilde + coef1^2 Var[x | x_t]) at few steps, so both
    # come out too narrow alike (std 0.35 for S = 0.4 measured at 50 steps); the mean is right
    assert abs(ddim.mean().item() - MU) < 0.02 and ddim.std().item() < S
    eta_half = d.ddim_sample_loop(fn, noise, y, eta=0.5, generator=torch.Generator().manual_seed(4))
    assert anc.std().item() - 5 * se_std < eta_half.std().item() < S + 5 * se_std  # between the two


def test_ddim_respacing_and_model_times():
    seen = []

    def fn(x_t, t_model, y):
        seen.append(t_model[0].item())
        return torch.cat([0.1 * x_t, torch.zeros_like(x_t)], dim=1)  # learned-Sigma layout: v channels ignored

    d = create_diffusion("4")
    out = d.ddim_sample_loop(fn, torch.randn(2, 3, 2, 2), torch.tensor([0, 1]))
    assert out.shape == (2, 3, 2, 2) and seen == [999.0, 666.0, 333.0, 0.0]
    # iDDPM's "ddimN" spacing: the stride s with len(range(0, 1000, s)) == N
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim30") == set(range(0, 1000, 34))
    seen.clear()
    create_diffusion("ddim4").ddim_sample_loop(fn, torch.randn(1, 3, 2, 2), torch.tensor([0]))
    assert seen == [750.0, 500.0, 250.0, 0.0]
    with pytest.raises(ValueError, match="equally strided"):
        space_timesteps(10, "ddim11")
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        d.ddim_sample_loop(fn, torch.randn(1, 3, 2, 2), torch.tensor([0]), eta=1.5)
    with pytest.raises(ValueError, match="needs noise"):
        d.ddim_sample(torch.zeros(1, 6, 2, 2), torch.zeros(1, 3, 2, 2), torch.tensor([2]), eta=0.5)
