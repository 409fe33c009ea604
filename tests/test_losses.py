"""Denoising and alignment losses, token-grid resampling and RepaLoss (golden official REPA values)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from repa.losses import RepaLoss, alignment_loss, alignment_per_sample, denoising_loss, resample_tokens

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    from repa.models import DiffusionTransformer

    case = json.loads((GOLDEN / "case.json").read_text())
    model = DiffusionTransformer(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=10,
        class_dropout_prob=0.1, align_depth=2, encoder_dims=[32], projector_dim=128,
    )  # fmt: skip
    model.load_state_dict(load_file(GOLDEN / "model.safetensors"), strict=True)
    return model, load_file(GOLDEN / "loss.safetensors"), case


def _max_err(terms, ref, prefix=""):
    return max(
        (terms["denoise/per_sample"] - ref[f"{prefix}denoise_per_sample"]).abs().max().item(),
        abs(terms["align"].item() - ref[f"{prefix}proj_loss"].item()),
    )


# ------------------------------------------------------------------------------------------------ golden


def test_golden_eval_seeded(golden):
    model, ref, case = golden
    model.eval()
    loss = RepaLoss(path="linear", prediction="v", time_sampling="uniform", align_coeff=0.5)
    torch.manual_seed(1234)  # case.json: t = rand((B,1,1,1)) then noise = randn_like(x)
    with torch.no_grad():
        terms = loss(model, ref["x"], ref["y"], [ref["zs_target_0"]], per_sample=True)
    assert _max_err(terms, ref) <= TOL
    assert abs(terms["total"].item() - ref["loss_total_coeff0p5"].item()) <= TOL
    assert abs(terms["align"].item() - case["loss"]["values"]["proj_loss"]) <= TOL
    torch.testing.assert_close(terms["align/0"], terms["align"])
    assert set(terms) == {"denoise", "align", "align/0", "total", "denoise/per_sample", "align/per_sample"}
    # the seeded draws are the recorded ones
    torch.manual_seed(1234)
    assert torch.equal(loss.draw_time(ref["x"]), ref["t"])
    assert torch.equal(torch.randn_like(ref["x"]), ref["noise"])


def test_golden_eval_injected(golden):
    model, ref, _ = golden
    model.eval()
    with torch.no_grad():
        terms = RepaLoss()(model, ref["x"], ref["y"], [ref["zs_target_0"]], t=ref["t"], noise=ref["noise"],
                           per_sample=True)  # fmt: skip
    assert _max_err(terms, ref) <= TOL
    assert abs(terms["total"].item() - ref["loss_total_coeff0p5"].item()) <= TOL


def test_golden_intermediates(golden):
    model, ref, _ = golden
    from repa.transport import LinearPath

    path = LinearPath()
    torch.testing.assert_close(path.interpolate(ref["x"], ref["noise"], ref["t"]), ref["x_t"], atol=0, rtol=0)
    torch.testing.assert_close(path.velocity_target(ref["x"], ref["noise"], ref["t"]), ref["v_target"], atol=0, rtol=0)
    torch.testing.assert_close(ref["t"], ref["t_model"], atol=0, rtol=0)


def test_golden_train_seeded(golden):
    """Train mode: draws t, noise, then the model's label-drop rand(B); seed 2004 drops label 1."""
    model, ref, case = golden
    model.train()
    try:
        torch.manual_seed(2004)
        with torch.no_grad():
            terms = RepaLoss()(model, ref["x"], ref["y"], [ref["zs_target_0"]], per_sample=True)
    finally:
        model.eval()
    assert _max_err(terms, ref, "train_") <= TOL
    assert case["loss"]["values"]["train_label_drop_mask"] == [False, True, False, False]


def test_golden_train_injected(golden):
    model, ref, _ = golden
    model.train()
    drop = (ref["train_label_drop_u"] < 0.1).long()
    assert torch.equal(torch.where(drop.bool(), 10, ref["y"]), ref["train_y_effective"])
    try:
        with torch.no_grad():
            terms = RepaLoss()(model, ref["x"], ref["y"], [ref["zs_target_0"]], t=ref["train_t"],
                               noise=ref["train_noise"], model_kwargs={"force_drop_ids": drop}, per_sample=True)  # fmt: skip
    finally:
        model.eval()
    assert _max_err(terms, ref, "train_") <= TOL


# ------------------------------------------------------------------------------------------------ alignment


def _official_proj_loss(zs, zs_tilde):
    """The official SILoss projection loss (loop over encoders and samples)."""
    proj, bsz = 0.0, zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            proj = proj + (-(F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1)).sum(dim=-1)).mean()
    return proj / (len(zs) * bsz)


def test_alignment_cos_matches_official_formula():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 5, generator=g)]
    targets = [torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 5, generator=g)]
    ours = alignment_loss(preds, targets)
    assert ours.ndim == 0 and ours.dtype == torch.float32
    torch.testing.assert_close(ours, _official_proj_loss(targets, preds), atol=1e-6, rtol=0)


def test_alignment_identical_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 9, 6, generator=g)
    assert alignment_loss([z], [z]).item() == pytest.approx(-1.0, abs=1e-6)
    assert alignment_loss([z], [-z]).item() == pytest.approx(1.0, abs=1e-6)
    other = torch.randn(4, 9, 6, generator=g)
    scale = torch.rand(4, 9, 1, generator=g) * 100 + 0.01  # positive per-token scales
    torch.testing.assert_close(alignment_loss([z * scale], [other]), alignment_loss([z], [other]), atol=1e-6, rtol=0)
    torch.testing.assert_close(alignment_loss([z], [other * 3.7]), alignment_loss([z], [other]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["cos", "ntxent"])
def test_alignment_low_precision_finite(dtype, kind):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 16, 768, generator=g)
    # near the top of each format's range: squares overflow in fp16 (65504) and sums of squares in bf16 (3e38)
    huge = z.clamp(-1, 1) * (6e4 if dtype == torch.float16 else 1e30)
    for pred, target in [(z * 1e-6, z * 1e-6), (huge, huge), (z * 1e-6, huge)]:
        loss = alignment_loss([pred.to(dtype)], [target.to(dtype)], kind=kind)
        assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
        ref = alignment_loss([pred.to(dtype).float()], [target.to(dtype).float()], kind=kind)
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    if kind == "cos":
        assert alignment_loss([(z * 1e-6).to(dtype)], [(z * 1e-6).to(dtype)]).item() == pytest.approx(-1, abs=1e-3)
    zero = torch.zeros(2, 16, 768, dtype=dtype)
    assert bool(torch.isfinite(alignment_loss([zero], [zero], kind=kind)))


def test_alignment_under_autocast_is_fp32():
    g = torch.Generator().manual_seed(3)
    p, t = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    for kind in ["cos", "ntxent"]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = alignment_loss([p], [t], kind=kind)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, alignment_loss([p], [t], kind=kind), atol=1e-6, rtol=0)


def test_ntxent_definition():
    n, d = 8, 8
    eye = torch.eye(n, d).expand(3, n, d)  # orthonormal tokens: positives cos 1, negatives cos 0
    loss = alignment_loss([eye], [eye], kind="ntxent", temperature=0.1).item()
    expected = -math.log(math.exp(10) / (math.exp(10) + (n - 1)))  # InfoNCE with logits 1/T vs 0
    assert loss == pytest.approx(expected, abs=1e-6)  # float32 log-softmax near 0
    const = torch.ones(3, n, d)  # every token identical: chance level log N
    assert alignment_loss([const], [const], kind="ntxent").item() == pytest.approx(math.log(n), rel=1e-5)
    per = alignment_per_sample(eye, eye, "ntxent")
    assert per.shape == (3,)
    with pytest.raises(ValueError, match="unknown alignment kind"):
        alignment_loss([eye], [eye], kind="l2")


def test_resample_tokens():
    g = torch.Generator().manual_seed(4)
    tok = torch.randn(2, 64, 5, generator=g)
    assert resample_tokens(tok, (8, 8)) is tok
    assert resample_tokens(tok, 8) is tok
    # a constant field stays constant; a linear ramp keeps its mean
    const = torch.full((2, 256, 3), 2.5)
    torch.testing.assert_close(resample_tokens(const, 8), torch.full((2, 64, 3), 2.5))
    ramp = torch.arange(16.0).repeat(16).view(1, 256, 1)  # x coordinate on a 16x16 grid
    small = resample_tokens(ramp, (8, 8))
    assert small.shape == (1, 64, 1)
    assert small.mean().item() == pytest.approx(7.5, abs=1e-4)
    assert resample_tokens(tok, (16, 16)).shape == (2, 256, 5)
    assert resample_tokens(tok, (4, 4), mode="area").shape == (2, 16, 5)
    assert resample_tokens(torch.randn(1, 12, 2), (2, 2), src_grid_hw=(3, 4)).shape == (1, 4, 2)
    with pytest.raises(ValueError, match="not a square grid"):
        resample_tokens(torch.randn(1, 12, 2), (2, 2))
    with pytest.raises(ValueError, match="does not hold"):
        resample_tokens(torch.randn(1, 12, 2), (2, 2), src_grid_hw=(3, 3))
    assert resample_tokens(tok.to(torch.bfloat16), 4).dtype == torch.bfloat16


def test_alignment_resamples_targets_or_raises():
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(2, 64, 8, generator=g)  # model grid 8x8
    target = torch.randn(2, 256, 8, generator=g)  # encoder grid 16x16
    loss = alignment_loss([pred], [target])
    torch.testing.assert_close(loss, alignment_loss([pred], [resample_tokens(target, 8)]))
    with pytest.raises(ValueError, match="model has 64 tokens but the encoder gives 256"):
        alignment_loss([pred], [target], resample=False)
    with pytest.raises(ValueError, match="not a square grid"):
        alignment_loss([torch.randn(2, 12, 8)], [target])
    with pytest.raises(ValueError, match="feature dimension"):
        alignment_loss([pred], [torch.randn(2, 64, 9)])
    with pytest.raises(ValueError, match="2 projector outputs for 1"):
        alignment_loss([pred, pred], [target])


def test_denoising_loss():
    pred = torch.ones(3, 2, 4, 4, dtype=torch.bfloat16)
    target = torch.zeros(3, 2, 4, 4)
    target[1] = 3.0
    out = denoising_loss(pred, target)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1.0, 4.0, 1.0]))


# ------------------------------------------------------------------------------------------------ RepaLoss


class _Toy(nn.Module):
    """Tiny stand-in model: (x_t, t, y) -> (out with `out_mult` x C channels, [tokens]) recording its inputs."""

    def __init__(self, c: int = 2, out_mult: int = 1, dims=(6,)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c * out_mult, 1)
        self.proj = nn.ModuleList(nn.Linear(c, d) for d in dims)
        self.calls = []

    def forward(self, x_t, t, y, *, force_drop_ids=None, project=True):
        self.calls.append({"x_t": x_t, "t": t, "y": y, "force_drop_ids": force_drop_ids, "project": project})
        out = self.conv(x_t) * (1 + t.view(-1, 1, 1, 1))
        tokens = x_t.flatten(2).transpose(1, 2)  # (B, HW, C)
        return out, ([p(tokens) for p in self.proj] if project else [])


def test_repa_loss_draw_order_and_generator():
    model = _Toy()
    x, y = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    targets = [torch.randn(3, 16, 6)]
    loss = RepaLoss()
    torch.manual_seed(11)
    a = loss(model, x, y, targets)
    torch.manual_seed(11)
    t = torch.rand(3)
    noise = torch.randn_like(x)
    b = loss(model, x, y, targets, t=t, noise=noise)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    torch.testing.assert_close(a["total"], a["denoise"] + 0.5 * a["align"])
    c = loss(model, x, y, targets, generator=torch.Generator().manual_seed(5))
    d = loss(model, x, y, targets, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(c["total"], d["total"], atol=0, rtol=0)
    kw = model.calls[-1]
    assert kw["t"].shape == (3,) and kw["t"].dtype == torch.float32 and kw["project"] is True


def test_repa_loss_vanilla_and_errors():
    model = _Toy(dims=(6, 4))
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    out = RepaLoss(align_coeff=0.5)(model, x, y, None)
    assert out["align"].item() == 0.0 and model.calls[-1]["project"] is False
    torch.testing.assert_close(out["total"], out["denoise"])
    two = RepaLoss()(model, x, y, [torch.randn(2, 16, 6), torch.randn(2, 16, 4)])
    assert {"align/0", "align/1"} <= set(two)
    torch.testing.assert_close(two["align"], (two["align/0"] + two["align/1"]) / 2)
    with pytest.raises(ValueError, match="2 projector outputs for 1 encoder"):
        RepaLoss()(model, x, y, [torch.randn(2, 16, 6)])
    for kwargs, match in [({"path": "vp"}, "unknown interpolation path"), ({"prediction": "eps"}, "not supported"),
                          ({"time_sampling": "beta"}, "unknown time"), ({"align_kind": "l1"}, "unknown alignment"),
                          ({"diffusion": "edm"}, "unknown diffusion")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            RepaLoss(**kwargs)


def test_repa_loss_grad_and_autocast():
    model = _Toy()
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    targets = [torch.randn(2, 16, 6)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = RepaLoss(align_kind="ntxent")(model, x, y, targets, generator=torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 for v in terms.values())
    terms["total"].backward()
    assert model.conv.weight.grad is not None and model.proj[0].weight.grad is not None


def test_repa_loss_cosine_lognormal():
    model = _Toy()
    x, y = torch.randn(4, 2, 4, 4), torch.arange(4)
    loss = RepaLoss(path="cosine", time_sampling="lognormal")
    terms = loss(model, x, y, [torch.randn(4, 16, 6)], generator=torch.Generator().manual_seed(1))
    t = model.calls[-1]["t"]
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(t, 2 / math.pi * torch.atan(torch.randn(4, generator=g).exp()))
    assert bool(torch.isfinite(terms["total"]))


def test_repa_loss_ddpm():
    from repa.transport import create_diffusion

    model = _Toy(out_mult=2)  # eps and v channels
    x, y = torch.rand(3, 2, 4, 4) * 2 - 1, torch.tensor([0, 1, 2])
    targets = [torch.randn(3, 16, 6)]
    loss = RepaLoss(diffusion="ddpm", align_coeff=0.5)
    torch.manual_seed(3)
    terms = loss(model, x, y, targets)
    torch.manual_seed(3)
    timestep = torch.randint(0, 1000, (3,))  # DiT's draw order: timesteps, then noise
    noise = torch.randn_like(x)
    assert torch.equal(model.calls[-1]["t"], timestep.float())  # raw integer timestep as float
    d = create_diffusion()
    x_t = d.q_sample(x, timestep, noise)
    torch.testing.assert_close(model.calls[-1]["x_t"], x_t)
    ref = d.training_losses(model(x_t, timestep.float(), y)[0], x, x_t, timestep, noise)
    torch.testing.assert_close(terms["denoise"], ref["loss"].mean())
    torch.testing.assert_close(terms["mse"] + terms["vb"], terms["denoise"])
    torch.testing.assert_close(terms["total"], terms["denoise"] + 0.5 * terms["align"])
    # float times in [0, 1) map to floor(t T), so the loop's uniform draws work unchanged
    loss(model, x, y, targets, t=torch.tensor([0.0, 0.5, 0.9999]), noise=noise)
    assert model.calls[-1]["t"].tolist() == [0.0, 500.0, 999.0]


# ------------------------------------------------------------------------------------- REPA family options


def test_golden_eval_seeded_with_the_family_options_configured_but_off(golden):
    """Family coefficients set but no family input (and schedule weight 1): the official values, bit for bit."""
    model, ref, _ = golden
    model.eval()
    configured = RepaLoss(attn_coeff=0.7, class_token_coeff=0.1, self_align_coeff=0.3, self_align_blocks=(1, 2))
    results = []
    for loss, kwargs in ((RepaLoss(), {}), (configured, {"align_weight": 1.0})):
        torch.manual_seed(1234)
        with torch.no_grad():
            results.append(loss(model, ref["x"], ref["y"], [ref["zs_target_0"]], per_sample=True, **kwargs))
    plain, family = results
    assert list(plain) == list(family) and all(torch.equal(plain[k], family[k]) for k in plain)
    assert _max_err(family, ref) <= TOL


def test_repa_loss_spatial_norm_matches_the_official_zscore():
    """iREPA's `spatial_zscore`: (x - alpha mean_T) / (std_T + 1e-6), torch's unbiased std, per image and channel."""
    from repa.losses import spatial_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=g) * 3 + 1
    official = (x - 0.6 * x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + 1e-6)
    torch.testing.assert_close(spatial_norm(x, 0.6), official, rtol=0, atol=0)
    model = _Toy()
    xs, y, targets = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2]), [torch.randn(3, 16, 6)]
    t, noise = torch.rand(3), torch.randn(3, 2, 4, 4)
    a = RepaLoss(spatial_norm_gamma=1.0)(model, xs, y, targets, t=t, noise=noise)
    b = RepaLoss()(model, xs, y, [spatial_norm(targets[0], 1.0)], t=t, noise=noise)
    torch.testing.assert_close(a["total"], b["total"], rtol=0, atol=0)
