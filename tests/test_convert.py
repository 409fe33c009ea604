"""Official checkpoint formats: small models saved in the REPA (`last.pt`), SiT and DiT layouts, loaded back through
`repa.convert`; SiT's time/sign conventions converted exactly (wrapper and weight surgery), sampling runs,
fine-tuning adds fresh projectors with strict backbone keys, DDPM view for analysis."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from repa.analysis.hooks import collect_hidden_states
from repa.analysis.run import _as_loaded, model_features
from repa.config import from_dict
from repa.convert import (
    DDPMAnalysisView,
    SiTWrapper,
    detect_format,
    linear_to_ddpm,
    repa_to_sit_state_dict,
    sit_to_repa_state_dict,
    timestep_reflection,
)
from repa.loading import LoadedModel, load_for_finetuning, load_official
from repa.models import DiffusionTransformer
from repa.models.layers import timestep_features
from repa.samplers import euler_maruyama_sampler, euler_sampler, model_velocity_fn
from repa.transport import create_diffusion, ddpm_model_fn, sit_velocity_fn_to_repa

torch.set_num_threads(2)
# the head count is not in the weights: official widths map to theirs (1152 -> 16), small tests pass num_heads
SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=4, num_classes=5)


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (the official init zeroes adaLN and the final layer: outputs would be trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "embedding" in name else 0.1))
    return model.eval()


def repa_sit(seed=0, **kw):
    return randomised(DiffusionTransformer(**{**SMALL, **kw}), seed)


def inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g), torch.tensor([0, 3, 5][:b])


def test_timestep_reflection_maps_t_to_one_minus_t():
    r = timestep_reflection(256)
    torch.testing.assert_close(r @ r, torch.eye(256, dtype=torch.float64))
    t = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0])
    torch.testing.assert_close((r.float() @ timestep_features(t).T).T, timestep_features(1 - t), atol=1e-5, rtol=0)


def test_sit_surgery_matches_the_convention_definition():
    """A SiT built from a REPA model M by the inverse surgery satisfies -sit(x, 1 - t)[:, :C] = M(x, t)."""
    m = repa_sit()
    sit_state = repa_to_sit_state_dict(m.state_dict())
    assert sit_state["final_layer.linear.weight"].shape[0] == 2 * 2 * 8  # learn_sigma: 2C outputs
    sit = DiffusionTransformer(**SMALL, learn_sigma=True).eval()
    sit.load_state_dict(sit_state, strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        v_sit = sit(x, 1 - t, y)[0][:, :4]
        torch.testing.assert_close(-v_sit, m.velocity(x, t, y), atol=2e-5, rtol=1e-4)
        back = DiffusionTransformer(**SMALL).eval()
        back.load_state_dict(sit_to_repa_state_dict(sit_state), strict=True)
        torch.testing.assert_close(back.velocity(x, t, y), m.velocity(x, t, y), atol=2e-5, rtol=1e-4)


@pytest.fixture
def sit_file(tmp_path):
    """The public SiT layout: a bare state dict, learn_sigma=True (Sigma rows untrained: zero)."""
    m = repa_sit()
    path = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(repa_to_sit_state_dict(m.state_dict()), path)
    return m, path


def test_sit_checkpoint_wrapper_and_conversion(sit_file, tmp_path):
    m, path = sit_file
    state = torch.load(path, weights_only=True)
    assert detect_format(state) == "sit" and detect_format(state, {"filename": path.name}) == "sit"
    x, t, y = inputs()
    with torch.no_grad():
        want = m.velocity(x, t, y)
        wrapped, info = load_official(path, sit="wrap", num_heads=4)
        assert isinstance(wrapped, SiTWrapper) and info["format"] == "sit" and not wrapped.learn_sigma
        sit_fn = sit_velocity_fn_to_repa(lambda x_, t_, y_: wrapped.model(x_, t_, y_)[0][:, :4])
        torch.testing.assert_close(wrapped.velocity(x, t, y), sit_fn(x, t, y), atol=0, rtol=0)
        torch.testing.assert_close(wrapped.velocity(x, t, y), want, atol=2e-5, rtol=1e-4)
        h_wrap = wrapped.forward_hidden(x, t, y, [1, 2])
        h_ref = m.forward_hidden(x, t, y, [1, 2])
        for k in (1, 2):
            torch.testing.assert_close(h_wrap[k], h_ref[k], atol=2e-5, rtol=1e-4)
        converted, info = load_official(path, num_heads=4)  # default: weight surgery -> a plain REPA-convention model
        assert isinstance(converted, DiffusionTransformer) and not converted.learn_sigma
        torch.testing.assert_close(converted.velocity(x, t, y), want, atol=2e-5, rtol=1e-4)

    # sampling runs through both and agrees with the equivalent REPA model
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 2])
    ref = euler_sampler(model_velocity_fn(m), noise, labels, num_steps=4, cfg_scale=1.5, null_label=5)
    for model in (wrapped, converted):
        out = euler_sampler(model_velocity_fn(model), noise, labels, num_steps=4, cfg_scale=1.5, null_label=5)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    sde = euler_maruyama_sampler(model_velocity_fn(wrapped), noise, labels, num_steps=4, generator=torch.Generator())
    assert sde.shape == noise.shape and torch.isfinite(sde).all()


def test_dit_checkpoint_loads_unchanged_and_samples(tmp_path):
    d = randomised(DiffusionTransformer(**SMALL, learn_sigma=True), seed=2)
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(d.state_dict(), path)
    assert detect_format(d.state_dict()) == "dit"  # trained Sigma rows
    model, info = load_official(path, num_heads=4)
    assert info["format"] == "dit" and model.learn_sigma
    x, _, y = inputs()
    t_model = torch.tensor([0.0, 500.0, 999.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t_model, y)[0], d(x, t_model, y)[0], atol=0, rtol=0)
    diffusion = create_diffusion("4")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = diffusion.p_sample_loop(ddpm_model_fn(model), noise, torch.tensor([0, 1]), generator=torch.Generator())
    b = diffusion.p_sample_loop(ddpm_model_fn(d), noise, torch.tensor([0, 1]), generator=torch.Generator())
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()


def test_ddpm_analysis_view_maps_linear_path_times():
    diffusion = create_diffusion(None)
    i = 500
    abar = diffusion.alphas_cumprod[i]
    t = 1 / (1 + (abar / (1 - abar)).sqrt())  # the linear-path time with step 500's noise ratio
    x, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_t = (1 - t.float()) * x + t.float() * noise
    x_vp, t_model = linear_to_ddpm(x_t, t.float(), diffusion)
    torch.testing.assert_close(t_model, torch.full((2,), float(i)), atol=1e-2, rtol=0)
    torch.testing.assert_close(x_vp, abar.sqrt().float() * x + (1 - abar).sqrt().float() * noise, atol=1e-5, rtol=0)
    d = randomised(DiffusionTransformer(**SMALL, learn_sigma=True), seed=2)
    y = torch.tensor([5, 5])
    view = DDPMAnalysisView(d)
    with torch.no_grad():
        got = view.forward_hidden(x_t, t.float(), y, [2])[2]
        torch.testing.assert_close(got, d.forward_hidden(x_vp, t_model, y, [2])[2])


def test_official_repa_last_pt(tmp_path):
    """REPA's train.py checkpoint: dict(model, ema, opt, args) with an argparse Namespace, projectors."""
    kw = dict(SMALL, num_heads=12, encoder_dims=[16], align_depth=1, projector_dim=32)
    model, ema = repa_sit(3, **kw), repa_sit(4, **kw)
    opt = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(model="SiT-B/2", encoder_depth=1, enc_type="dinov2-vit-b", proj_coeff=0.5)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args,
                "steps": 10}, tmp_path / "last.pt")  # fmt: skip
    # the args name SiT-B/2 (width 768), not these width-48 tensors: its 12 heads are not taken on trust
    with pytest.raises(ValueError, match=r"cannot tell the number of attention heads .* pass --num-heads"):
        load_official(tmp_path / "last.pt")
    loaded, info = load_official(tmp_path / "last.pt", num_heads=12)
    assert info["format"] == "repa" and info["ema"] and loaded.num_heads == 12 and loaded.align_depth == 1
    x, t, y = inputs()
    with torch.no_grad():
        out, zs = loaded(x, t, y)
        ref_out, ref_zs = ema(x, t, y)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(zs[0], ref_zs[0], atol=0, rtol=0)
    # fine-tuning with the same encoder keeps the projectors, with another width replaces them
    ft, report = load_for_finetuning(tmp_path / "last.pt", encoder_dims=[16], align_depth=1, projector_dim=32,
                                     num_heads=12)  # fmt: skip
    assert report["new_keys"] == [] and report["dropped_keys"] == [] and ft.training
    ft, report = load_for_finetuning(tmp_path / "last.pt", encoder_dims=[24], align_depth=1, projector_dim=32,
                                     num_heads=12)  # fmt: skip
    assert len(report["new_keys"]) == 6 and len(report["dropped_keys"]) == 6


def test_finetuning_from_sit_and_dit(sit_file, tmp_path):
    m, path = sit_file
    model, report = load_for_finetuning(path, encoder_dims=[16], align_depth=1, projector_dim=32, num_heads=4)
    assert report["format"] == "sit" and model.training and not model.learn_sigma and model.encoder_dims == (16,)
    assert report["new_keys"] == sorted(f"projectors.0.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))
    x, t, y = inputs()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.velocity(x, t, y), m.velocity(x, t, y), atol=2e-5, rtol=1e-4)
        assert model(x, t, y)[1][0].shape == (3, 16, 16)

    d = randomised(DiffusionTransformer(**SMALL, learn_sigma=True), seed=2)
    dit, report = load_for_finetuning(d.state_dict(), encoder_dims=[16], align_depth=2, format="dit", num_heads=4)
    assert report["format"] == "dit" and dit.learn_sigma and dit.align_depth == 2

    state = dict(d.state_dict())
    state["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.extra.weight'\]"):
        load_for_finetuning(state, encoder_dims=[16], align_depth=1, format="dit")
    del state["blocks.0.extra.weight"], state["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.fc2.bias'\]"):
        load_for_finetuning(state, encoder_dims=[16], align_depth=1, format="dit")


def test_detect_format_rules():
    repa = repa_sit().state_dict()
    assert detect_format(repa) == "repa"  # C outputs: a velocity in REPA's convention
    fresh_dit = DiffusionTransformer(**SMALL, learn_sigma=True).state_dict()  # zero final layer: ambiguous
    assert detect_format(fresh_dit, {"filename": "DiT-XL-2-256x256.pt"}) == "dit"
    assert detect_format(fresh_dit, {"args": {"model": "DiT-XL/2"}}) == "dit"
    assert detect_format(fresh_dit, {"format": "dit"}) == "dit"
    assert detect_format(fresh_dit, {"source": "repa"}) == "repa"
    with pytest.raises(ValueError, match="format must be one of"):
        detect_format(repa, {"format": "edm"})
    with pytest.raises(ValueError, match="missing"):
        detect_format({"pos_embed": torch.zeros(1)})


def test_probe_and_align_see_ddpm_checkpoints_through_the_view():
    """DiT/DDPM checkpoints (official `format=dit`, or repa `transport.diffusion=ddpm`) are analysed through
    DDPMAnalysisView (same noise ratio as the linear path at time t); flow models are used as they are."""
    d = randomised(DiffusionTransformer(**SMALL, learn_sigma=True), seed=2).eval()
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for cfg, info in ((from_dict({}), {"format": "dit"}), (from_dict({"transport": {"diffusion": "ddpm"}}), {})):
        loaded = _as_loaded(LoadedModel(d, cfg, info, Path("x")), torch.device("cpu"))
        assert isinstance(loaded.model, DDPMAnalysisView) and loaded.model.model is d
        assert _as_loaded(loaded, torch.device("cpu")).model is loaded.model  # not wrapped twice
        feats = model_features(loaded, x, [1, 2], [0.25, 0.5], batch_size=4, seed=3, progress=False)
        want = collect_hidden_states(DDPMAnalysisView(d), x.split(4), [1, 2], [0.25, 0.5], seed=3)
        assert set(feats) == set(want) and all(torch.equal(feats[k], want[k]) for k in want)
        assert feats[(2, 0.5)].shape == (6, d.hidden_size) and torch.isfinite(feats[(2, 0.5)]).all()
    flow = _as_loaded(LoadedModel(d, from_dict({}), {"format": "repa"}, Path("x")), torch.device("cpu"))
    assert flow.model is d
