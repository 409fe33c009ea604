"""REG under DDPM: a class-token DiT samples with ancestral DDPM and DDIM, the class token denoised jointly with the
image on the same steps (the model receives it at every step), its noise drawn right after the image's, fixed small
variance beta_tilde, and dropped at the end; guidance covers both; `generate` and `repa sample` take such a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from repa.cli.main import main as cli_main
from repa.config import load_config
from repa.generate import generate
from repa.models import build_model
from repa.training import train
from repa.transport.ddpm import cfg_eps_fn, create_diffusion, ddpm_model_fn
from repa.transport.ddpm_joint import cfg_joint_eps_fn, ddpm_joint_model_fn
from tests.helpers.tiny import PatchEncoder, tiny_overrides

torch.set_num_threads(2)
ROOT = Path(__file__).parents[1]
D_CLS = 16


def reg_dit(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("DiT-T/2", input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                        encoder_dims=[D_CLS], projector_dim=24, align_depth=1, class_token_dim=D_CLS)  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero everywhere (the class-token head is zero-initialised)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def spy(fn, calls):
    def wrapped(x_t, cls_t, t_model, y):
        calls.append((x_t.clone(), cls_t.clone(), t_model.clone()))
        return fn(x_t, cls_t, t_model, y)

    return wrapped


def hand_ddpm(d, fn, noise, cls_noise, y, seed):
    """Two-state ancestral sampling written out: the image by `p_sample`, the class token by DDPM's posterior mean
    of its eps prediction with the fixed variance beta_tilde (log clipped); noises image first, then class token."""
    g = torch.Generator().manual_seed(seed)
    x, c = noise, cls_noise
    for i in reversed(range(d.num_timesteps)):
        ts = torch.full((x.shape[0],), i, dtype=torch.long)
        out, eps_c = fn(x, c, d.model_time(ts), y)
        z_x = torch.randn(x.shape, generator=g) if i > 0 else torch.zeros_like(x)
        z_c = torch.randn(c.shape, generator=g) if i > 0 else torch.zeros_like(c)
        x = d.p_sample(out, x, ts, z_x)
        abar = d.alphas_cumprod[i].float()
        pred_c = c / abar.sqrt() - (1 / abar - 1).sqrt() * eps_c
        mean = d.posterior_mean_coef1[i].float() * pred_c + d.posterior_mean_coef2[i].float() * c
        c = mean + (i > 0) * torch.exp(0.5 * d.posterior_log_variance_clipped[i].float()) * z_c
    return x, c


def test_ddpm_samples_the_class_token_jointly_and_drops_it():
    model = reg_dit()
    d = create_diffusion("3")
    g = torch.Generator().manual_seed(0)
    noise, cls_noise, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, D_CLS, generator=g), torch.tensor([0, 3])
    calls = []
    fn = spy(ddpm_joint_model_fn(model), calls)
    with torch.no_grad():
        x, c = d.p_sample_loop(fn, noise, y, cls_noise=cls_noise, generator=torch.Generator().manual_seed(5),
                               return_class_token=True)  # fmt: skip
        hx, hc = hand_ddpm(d, ddpm_joint_model_fn(model), noise, cls_noise, y, seed=5)
        dropped = d.p_sample_loop(fn, noise, y, cls_noise=cls_noise, generator=torch.Generator().manual_seed(5))
    assert x.shape == (2, 4, 8, 8) and c.shape == (2, D_CLS) and dropped.shape == (2, 4, 8, 8)
    torch.testing.assert_close(x, hx)
    torch.testing.assert_close(c, hc)
    torch.testing.assert_close(dropped, x)  # the class token is generated, then dropped
    # the model received the class token at every step: the initial noise first, then each updated state
    assert [float(t[0]) for _, _, t in calls[:3]] == [999.0, 500.0, 0.0]
    assert torch.equal(calls[0][1], cls_noise)
    assert all(not torch.equal(calls[k][1], calls[k + 1][1]) for k in range(2))
    assert not torch.allclose(c, cls_noise)
    # the class token changes the image: it is one more token of the sequence the image attends to
    with torch.no_grad():
        other = d.p_sample_loop(ddpm_joint_model_fn(model), noise, y, cls_noise=torch.zeros_like(cls_noise),
                                generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert not torch.allclose(other, x)
    with pytest.raises(ValueError, match="cls_noise"):
        d.p_sample_loop(fn, noise, y, cls_noise=torch.randn(3, D_CLS))
    with pytest.raises(ValueError, match="cls_eps"):
        d.p_sample_loop(fn, noise, y, cls_noise=cls_noise, eps=[torch.randn(2, 4, 8, 8)] * 2)
    with pytest.raises(ValueError, match="return_class_token"):
        d.p_sample_loop(ddpm_model_fn(model), noise, y, return_class_token=True)


def test_ddim_samples_the_class_token_jointly():
    model = reg_dit(1)
    d = create_diffusion("4")
    g = torch.Generator().manual_seed(2)
    noise, cls_noise, y = (
        torch.randn(3, 4, 8, 8, generator=g),
        torch.randn(3, D_CLS, generator=g),
        torch.tensor([0, 1, 2]),
    )
    calls = []
    with torch.no_grad():
        x, c = d.ddim_sample_loop(spy(ddpm_joint_model_fn(model), calls), noise, y, cls_noise=cls_noise,
                                  return_class_token=True)  # fmt: skip
        again = d.ddim_sample_loop(ddpm_joint_model_fn(model), noise, y, cls_noise=cls_noise)
    assert x.shape == (3, 4, 8, 8) and c.shape == (3, D_CLS) and len(calls) == 4
    torch.testing.assert_close(again, x)  # eta = 0: deterministic given the noises
    # one step by hand: DDIM (eta 0) of the class token from its eps prediction, the image by `ddim_sample`
    x0, c0, t0 = calls[0]
    out, eps_c = ddpm_joint_model_fn(model)(x0, c0, t0, y)
    abar, abar_prev = d.alphas_cumprod[3].float(), d.alphas_cumprod_prev[3].float()
    pred_c = c0 / abar.sqrt() - (1 / abar - 1).sqrt() * eps_c
    eps_again = (c0 / abar.sqrt() - pred_c) / (1 / abar - 1).sqrt()
    torch.testing.assert_close(calls[1][1], pred_c * abar_prev.sqrt() + (1 - abar_prev).sqrt() * eps_again)
    torch.testing.assert_close(calls[1][0], d.ddim_sample(out, x0, torch.full((3,), 3)))
    # eta > 0 draws noise for both states, image first
    with torch.no_grad():
        noisy = d.ddim_sample_loop(ddpm_joint_model_fn(model), noise, y, cls_noise=cls_noise, eta=1.0,
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert noisy.shape == x.shape and not torch.allclose(noisy, x)


def test_joint_guidance_guides_image_and_class_token():
    model = reg_dit(2)
    fn = ddpm_joint_model_fn(model)
    g = torch.Generator().manual_seed(3)
    x, c, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, D_CLS, generator=g), torch.tensor([1, 4])
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        cond, cond_c = fn(x, c, t, y)
        unc, unc_c = fn(x, c, t, torch.full_like(y, 5))
        out, out_c = cfg_joint_eps_fn(fn, 2.0, null_label=5)(x, c, t, y)
        torch.testing.assert_close(out[:, :4], unc[:, :4] + 2.0 * (cond[:, :4] - unc[:, :4]))
        torch.testing.assert_close(out[:, 4:], cond[:, 4:])  # the variance channels are the conditional ones
        torch.testing.assert_close(out_c, unc_c + 2.0 * (cond_c - unc_c))
        # the image's guidance equals the plain eps guidance of the same model with this class token
        plain = cfg_eps_fn(lambda x_, t_, y_: fn(x_, torch.cat([c] * (len(x_) // 2)), t_, y_)[0], 2.0, null_label=5)
        torch.testing.assert_close(out, plain(x, t, y))
        _, only_cond = cfg_joint_eps_fn(fn, 2.0, null_label=5, cls_cfg_scale=0.0)(x, c, t, y)
        torch.testing.assert_close(only_cond, cond_c)  # REG's rule: <= 0 = the conditional prediction
        outside, outside_c = cfg_joint_eps_fn(fn, 2.0, null_label=5, guidance_high=0.1)(x, c, t, y)
        torch.testing.assert_close(outside, cond)
        torch.testing.assert_close(outside_c, cond_c)


@pytest.mark.parametrize("sampler", ["ode", "ddim"])
def test_generate_samples_a_reg_dit(sampler, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      ["transport.diffusion=ddpm", f"sample.sampler={sampler}", "sample.num_steps=3",
                       "sample.cfg_scale=1.5"])  # fmt: skip
    model = reg_dit(3)
    x = generate(model, cfg, torch.tensor([0, 1, 2]), (4, 8, 8), seed=7)
    assert x.shape == (3, 4, 8, 8) and bool(torch.isfinite(x).all())
    torch.testing.assert_close(generate(model, cfg, torch.tensor([0, 1, 2]), (4, 8, 8), seed=7), x)


def test_a_reg_dit_trains_and_repa_sample_works(tmp_path, fmnist_root, monkeypatch):
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, "train.max_steps=2", "train.checkpoint_every=2", "repa.class_token=true",
                          "transport.diffusion=ddpm", "model.name=DiT-T/4", "sample.sampler=ddim")  # fmt: skip
    train(load_config(ROOT / "configs" / "tiny.yaml", over))
    out = tmp_path / "samples"
    assert cli_main(["sample", str(run), "--num", "4", "--steps", "2", "--out", str(out)]) == 0
    assert len(list(out.glob("*.npz"))) == 1
    # repa probe reads its hidden states: the class token gets a zero clean value on the image's path and time
    argv = ["probe", str(run), "--times", "0,0.5", "--layers", "1", "--num-train", "20", "--num-test", "20",
            "--epochs", "2", "--out", str(tmp_path / "probe"), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    rows = json.loads((tmp_path / "probe" / "probe.json").read_text())["rows"]
    assert len(rows) == 2 and all(0 <= r["test_acc"] <= 1 for r in rows)


def test_hidden_states_of_a_reg_model_feed_the_class_token_on_the_path():
    """The class token's input at time t is path(zero token, its noise, t) unless a clean token is given; the
    features are reproducible (the class noise comes from the batch's generator, after the image noise)."""
    from repa.analysis.hooks import collect_hidden_states, hidden_states
    from repa.models import build_model

    torch.manual_seed(0)
    model = build_model("SiT-T/4", input_size=8, in_channels=1, num_classes=3, hidden_size=32, depth=2, num_heads=2,
                        encoder_dims=[16], align_depth=1, projector_dim=16, class_token_dim=16).eval()  # fmt: skip
    seen = []
    model.class_token_embedder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    x = torch.randn(4, 1, 8, 8)
    cls_noise = torch.randn(4, 16)
    hidden_states(model, x, 0.0, [1], class_noise=cls_noise)
    torch.testing.assert_close(seen[-1], torch.zeros(4, 16))  # t = 0: the zero clean token itself
    hidden_states(model, x, 0.5, [1], class_noise=cls_noise)
    torch.testing.assert_close(seen[-1], 0.5 * cls_noise)  # linear path: (1 - t) * 0 + t * noise
    clean = torch.randn(4, 16)
    hidden_states(model, x, 0.5, [1], class_noise=cls_noise, class_token=clean)
    torch.testing.assert_close(seen[-1], 0.5 * clean + 0.5 * cls_noise)
    a = collect_hidden_states(model, [x], [1, 2], [0.0, 0.5], seed=3)
    b = collect_hidden_states(model, [x], [1, 2], [0.0, 0.5], seed=3)
    assert set(a) == {(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)}
    for key in a:
        assert a[key].shape == (4, 32)
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
