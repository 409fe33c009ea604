"""The REPA family as options: iREPA (conv projector, spatial norm), HASTE (schedule, attention alignment), REG (class
token), SRA (self-alignment), the spatial-structure scores, and "off = plain REPA, bit for bit"."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from repa.analysis.spatial import cds, lds, manhattan_distances, rmsc, spatial_metrics
from repa.losses import (
    RepaLoss,
    align_weight,
    alignment_per_sample,
    attention_alignment_per_sample,
    resample_attention,
    self_alignment_per_sample,
    spatial_norm,
    teacher_time,
)
from repa.models import build_model, forward_flops
from repa.models.layers import ConvProjector, build_projector
from repa.samplers import euler_maruyama_sampler, euler_sampler, model_joint_velocity_fn, model_velocity_fn
from repa.transport import get_path

torch.set_num_threads(2)
TINY = dict(input_size=8, hidden_size=32, depth=3, num_heads=2, num_classes=5, projector_dim=24, align_depth=2)


def tiny(name: str = "SiT-T/2", seed: int = 0, randomize: bool = True, **overrides):
    """A tiny model with every weight non-zero (so every part affects the outputs)."""
    torch.manual_seed(seed)
    model = build_model(name, **{**TINY, "encoder_dims": [16], **overrides})
    if randomize:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs(model, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = model.input_size
    x = torch.randn(batch, model.in_channels, s, s, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


def grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# ================================================================================================ models


def test_family_off_model_is_plain_repa_bit_for_bit():
    torch.manual_seed(3)
    plain = build_model("SiT-T/2", **TINY, encoder_dims=[16])
    torch.manual_seed(3)
    off = build_model("SiT-T/2", **TINY, encoder_dims=[16], projector="mlp", projector_kernel=5, class_token_dim=0,
                      self_align=False)  # fmt: skip
    a, b = plain.state_dict(), off.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # same keys, same init draws
    assert {k for k in a if k.startswith("projectors.")} == {f"projectors.0.{i}.{w}" for i in (0, 2, 4)
                                                             for w in ("weight", "bias")}  # fmt: skip
    x, t, y = inputs(plain)
    out_a, zs_a = tiny()(x, t, y)
    result = tiny()(x, t, y, attn_blocks=(), self_align_block=None, cls_t=None)
    assert len(result) == 2  # no family input: the plain (out, zs) pair
    assert torch.equal(out_a, result[0]) and torch.equal(zs_a[0], result[1][0])


def test_conv_projector_known_values_and_keys():
    proj = ConvProjector(hidden_size=1, encoder_dim=1, kernel_size=3)
    with torch.no_grad():
        proj.conv.weight.copy_(torch.arange(9.0).view(1, 1, 3, 3))  # [[0 1 2] [3 4 5] [6 7 8]]
        proj.conv.bias.fill_(0.5)
    tokens = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)  # 2x2 grid [[1 2] [3 4]], zero padding
    out = proj(tokens).flatten().tolist()
    # top-left sees (1 2; 3 4) at kernel taps 4 5 7 8: 4 + 10 + 21 + 32 = 67, and so on.
    assert out == [67.5, 4 * 2 + 3 * 1 + 7 * 4 + 6 * 3 + 0.5, 1 * 1 + 2 * 2 + 4 * 3 + 5 * 4 + 0.5, 1 * 0 + 2 * 1
                   + 3 * 3 + 4 * 4 + 0.5]  # fmt: skip
    assert set(proj.state_dict()) == {"conv.weight", "conv.bias"}
    with pytest.raises(ValueError, match="odd"):
        ConvProjector(4, 4, kernel_size=2)
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector(4, 8, 4, kind="attn")
    model = tiny(projector="conv", projector_kernel=3, encoder_dims=[16, 8])
    assert {k for k in model.state_dict() if k.startswith("projectors.")} == {
        f"projectors.{k}.conv.{w}" for k in (0, 1) for w in ("weight", "bias")
    }
    x, t, y = inputs(model)
    out, zs = model(x, t, y)
    hidden = model.forward_hidden(x, t, y, [2])[2]
    ref = F.conv2d(hidden.transpose(1, 2).reshape(3, 32, 4, 4), model.projectors[0].conv.weight,
                   model.projectors[0].conv.bias, padding=1).flatten(2).transpose(1, 2)  # fmt: skip
    assert [z.shape for z in zs] == [(3, 16, 16), (3, 16, 8)]
    torch.testing.assert_close(zs[0], ref)


def test_attention_maps_equal_the_fused_attention():
    model = tiny().eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        out, zs = model(x, t, y)
        out2, zs2, extras = model(x, t, y, attn_blocks=[1, 3])
        hidden = model.forward_hidden(x, t, y, [0, 2])
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zs2[0], zs[0], atol=1e-5, rtol=1e-5)
    assert sorted(extras["attn"]) == [1, 3] and extras["attn"][1].shape == (3, 2, 16, 16)
    block = model.blocks[2]  # block 3 reads the tokens after block 2
    c = model.t_embedder(t) + model.y_embedder(y, False)
    shift, scale = block.adaLN_modulation(c).chunk(6, dim=-1)[:2]
    h = block.norm1(hidden[2]) * (1 + scale[:, None]) + shift[:, None]
    q, k, _ = block.attn.qkv(h).reshape(3, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(extras["attn"][3], q @ k.transpose(-1, -2) / 4.0)  # Q K^T / sqrt(16)
    with pytest.raises(ValueError, match="attn_blocks"):
        model(x, t, y, attn_blocks=[4])


def test_attention_gradients_reach_only_the_blocks_up_to_the_chosen_one():
    model = tiny()
    x, t, y = inputs(model)
    _, _, extras = model(x, t, y, attn_blocks=[2], project=False)
    extras["attn"][2].square().mean().backward()
    g = grads(model)
    assert g["blocks.1.attn.qkv.weight"].abs().sum() > 0 and g["blocks.0.mlp.fc1.weight"].abs().sum() > 0
    untouched = [n for n in g if n.startswith(("blocks.2.", "final_layer.", "projectors.")) or ".attn.proj." in n
                 and n.startswith("blocks.1.") or ".mlp." in n and n.startswith("blocks.1.")]  # fmt: skip
    assert untouched and all(g[n] is None or g[n].abs().sum() == 0 for n in untouched)


def test_attention_maps_with_gradient_checkpointing():
    model = tiny()
    model.grad_checkpointing = True
    x, t, y = inputs(model)
    _, _, extras = model(x, t, y, attn_blocks=[1])
    extras["attn"][1].mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_class_token_model_shapes_keys_and_zero_init():
    plain_keys = set(tiny().state_dict())
    torch.manual_seed(0)
    model = build_model("SiT-T/2", **TINY, encoder_dims=[16], class_token_dim=16)
    new = set(model.state_dict()) - plain_keys
    assert new == {"class_token_embedder.proj.weight", "class_token_embedder.proj.bias", "class_token_embedder.norm.weight",
                   "class_token_embedder.norm.bias", "class_token_head.weight", "class_token_head.bias"}  # fmt: skip
    x, t, y = inputs(model)
    cls_t = torch.randn(3, 16)
    out, zs, extras = model(x, t, y, cls_t=cls_t, attn_blocks=[1])
    assert out.shape == (3, 4, 8, 8) and zs[0].shape == (3, 16, 16)
    assert extras["class_token"].shape == (3, 16) and torch.count_nonzero(extras["class_token"]) == 0  # zero head
    assert [z.shape for z in extras["class_token_zs"]] == [(3, 16)]
    assert extras["attn"][1].shape == (3, 2, 16, 16)  # the class token's row and column are dropped
    v, v_cls = model.velocity_joint(x, cls_t, t, y)
    assert v.shape == (3, 4, 8, 8) and v_cls.shape == (3, 16)
    with pytest.raises(ValueError, match="cls_t must have shape"):
        model(x, t, y)
    with pytest.raises(ValueError, match="no class token"):
        tiny()(x, t, y, cls_t=cls_t)


def test_class_token_is_one_more_token_of_the_sequence():
    """The class token enters as token 0 (embedding, no position), the patches are unchanged around it."""
    model = tiny(class_token_dim=16).eval()
    x, t, y = inputs(model)
    cls_t = torch.randn(3, 16)
    with torch.no_grad():
        out, zs, extras = model(x, t, y, cls_t=cls_t)
        tokens = torch.cat([model.class_token_embedder(cls_t), model.x_embedder(x) + model.pos_embed], dim=1)
        c = model.t_embedder(t) + model.y_embedder(y, False)
        for i, block in enumerate(model.blocks):
            tokens = block(tokens, c)
            if i + 1 == model.align_depth:
                torch.testing.assert_close(zs[0], model.projectors[0](tokens[:, 1:]))
                torch.testing.assert_close(extras["class_token_zs"][0], model.projectors[0](tokens[:, 0]))
        h = model.final_layer.modulated(tokens, c)
    torch.testing.assert_close(out, model.unpatchify(model.final_layer.linear(h[:, 1:])))
    torch.testing.assert_close(extras["class_token"], model.class_token_head(h[:, 0]))
    conv = tiny(class_token_dim=16, projector="conv")
    _, _, extras = conv(x, t, y, cls_t=cls_t)  # the class token is a 1x1 grid: the kernel's centre tap
    assert extras["class_token_zs"][0].shape == (3, 16)


def test_self_align_head_reads_the_chosen_block():
    model = tiny(self_align=True, encoder_dims=[]).eval()
    assert {k for k in model.state_dict() if k.startswith("self_align_head.")} == {
        f"self_align_head.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")
    }
    assert model.self_align_head[0].weight.shape == (64, 32) and model.self_align_head[2].weight.shape == (32, 64)
    x, t, y = inputs(model)
    with torch.no_grad():
        _, zs, extras = model(x, t, y, self_align_block=1)
        hidden = model.forward_hidden(x, t, y, [1])[1]
    assert zs == []
    torch.testing.assert_close(extras["self_align"], model.self_align_head(hidden))
    with pytest.raises(ValueError, match="self_align=True"):
        tiny()(x, t, y, self_align_block=1)


@pytest.mark.parametrize("options", [dict(projector="conv", encoder_dims=[16, 8]), dict(class_token_dim=16),
                                     dict(class_token_dim=16, projector="conv")])  # fmt: skip
def test_forward_flops_count_the_family_options(options):
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny("DiT-T/2", **options)
    x, t, y = inputs(model, batch=2)
    kwargs = {"cls_t": torch.randn(2, 16)} if options.get("class_token_dim") else {}
    with FlopCounterMode(display=False) as counter:
        model(x, t, y, **kwargs)
    ours = forward_flops(model, batch=2, include_projectors=True)
    tokens, D = model.num_patches + model.num_prefix, model.hidden_size
    attention = 2 * 2 * model.depth * 2 * tokens * tokens * D
    assert counter.get_total_flops() in (ours, ours - attention)


# ============================================================================================== encoders


ENC_TINY_VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
ENC_TINY_DINO = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)


def _encoder(name: str, layer: int | None = None):
    from repa.encoders import ENCODERS, load_encoder

    over = ENC_TINY_DINO if ENCODERS[name].family in ("dinov2", "dinov2-reg") else ENC_TINY_VIT
    return load_encoder(name, 112, random_init=True, config_overrides=over, layer=layer)


@pytest.mark.parametrize(
    "name, kind", [("dinov2-vit-b", "cls"), ("dinov2-vit-b-reg", "cls"), ("clip-vit-l", "cls"),
                   ("siglip-vit-b", "mean"), ("jepa-vit-h", "mean"), ("mocov3-vit-b", "cls")],
)  # fmt: skip
def test_encoder_global_token_and_attention_maps(name, kind):
    enc = _encoder(name)
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = enc.encode(images, global_token=True, attention_layers=[1, 3])
    assert torch.equal(out.tokens, enc(images))  # the default output is untouched
    assert enc.global_token_kind == kind and out.global_token.shape == (2, 32)
    pixels = enc.preprocess(images)
    seq = enc._sequence(pixels)
    expected = seq[:, 0] if kind == "cls" else seq[:, enc.num_prefix :].mean(dim=1)
    torch.testing.assert_close(out.global_token, expected)
    # attention: the eager reference's maps, patch rows/columns only, rows renormalised (HASTE drops the CLS)
    model = copy.deepcopy(enc.model)
    model.set_attn_implementation("eager")
    kw = {} if enc.family.startswith("dinov2") else {"interpolate_pos_encoding": True}
    ref = model(pixel_values=pixels, output_attentions=True, **kw).attentions
    p = enc.num_prefix
    for layer in (1, 3):
        r = ref[layer - 1][:, :, p:, p:]
        torch.testing.assert_close(out.attentions[layer], r / r.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
        assert out.attentions[layer].shape == (2, 2, enc.num_tokens, enc.num_tokens)
    plain = enc.encode(images)
    assert plain.global_token is None and plain.attentions == {}


def test_encoder_attention_errors():
    enc = _encoder("dinov2-vit-b", layer=2)
    images = torch.zeros(1, 3, 28, 28)
    assert enc.encode(images, attention_layers=[2]).attentions[2].shape[-1] == enc.num_tokens
    with pytest.raises(ValueError, match=r"attention_layers must be in \[1, 2\]"):
        enc.encode(images, attention_layers=[3])
    from repa.encoders import load_encoder

    mobile = load_encoder("mobilenetv2-imagenet", 64, random_init=True)
    out = mobile.encode(images, global_token=True)
    assert mobile.global_token_kind == "mean"
    torch.testing.assert_close(out.global_token, mobile(images).mean(dim=1))
    with pytest.raises(ValueError, match="has no attention maps"):
        mobile.encode(images, attention_layers=[1])


# ================================================================================================ losses


def test_spatial_norm_known_values():
    x = torch.tensor([[[1.0, 10.0], [3.0, 10.0], [5.0, 13.0]]])  # (B=1, N=3, D=2)
    out = spatial_norm(x, gamma=0.6)
    # channel 0: mean 3, unbiased std 2 -> (x - 1.8) / 2; channel 1: mean 11, std sqrt(3)
    torch.testing.assert_close(out[0, :, 0], (torch.tensor([1.0, 3.0, 5.0]) - 1.8) / (2 + 1e-6))
    torch.testing.assert_close(out[0, :, 1], (torch.tensor([10.0, 10.0, 13.0]) - 6.6) / (math.sqrt(3) + 1e-6))
    z = spatial_norm(torch.randn(4, 16, 8), gamma=1.0)
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(4, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=1), torch.ones(4, 8), atol=1e-4, rtol=0)
    assert spatial_norm(torch.randn(2, 4, 3).to(torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="N >= 2"):
        spatial_norm(torch.randn(2, 1, 3))


def test_align_weight_schedules():
    assert align_weight(10**7) == 1.0
    assert [align_weight(s, "stop", stop_step=250_000) for s in (0, 249_999, 250_000, 10**6)] == [1, 1, 0, 0]
    lin = [align_weight(s, "linear", start_step=100, stop_step=200) for s in (0, 100, 150, 175, 200, 300)]
    assert lin == [1.0, 1.0, 0.5, 0.25, 0.0, 0.0]
    cos = [align_weight(s, "cosine", start_step=100, stop_step=200) for s in (50, 100, 125, 150, 200, 201)]
    assert cos == pytest.approx([1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.0, 0.0])
    assert align_weight(50, "linear", stop_step=100) == 0.5  # start_step defaults to 0
    for kwargs, match in [(dict(kind="stop"), "stop_step"), (dict(kind="exp", stop_step=5), "unknown schedule"),
                          (dict(kind="linear", start_step=5, stop_step=5), "start_step < stop_step")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            align_weight(0, **kwargs)


def test_attention_alignment_known_values():
    n = 4
    uniform = torch.full((1, 1, n, n), 1.0 / n)
    assert attention_alignment_per_sample(torch.zeros(1, 1, n, n), uniform).item() == pytest.approx(math.log(n))
    logits = torch.randn(2, 3, n, n)
    onehot = F.one_hot(torch.tensor([2, 0, 1, 3]), n).float().expand(2, 3, n, n)
    expected = -F.log_softmax(logits, -1)[..., torch.arange(n), [2, 0, 1, 3]].mean(dim=(1, 2))
    torch.testing.assert_close(attention_alignment_per_sample(logits, onehot), expected)
    p = torch.softmax(torch.randn(2, 3, n, n), -1)  # the minimum is the teacher's entropy, at logits = log p
    entropy = -(p * p.log()).sum(-1).mean(dim=(1, 2))
    torch.testing.assert_close(attention_alignment_per_sample(p.log() + 5.0, p), entropy)
    # heads: the first min(H_model, H_enc) heads pair up (HASTE: 16 model heads, 12 teacher heads)
    six = torch.randn(2, 6, n, n)
    torch.testing.assert_close(attention_alignment_per_sample(six, p), attention_alignment_per_sample(six[:, :3], p))
    torch.testing.assert_close(attention_alignment_per_sample(six[:, :2], p), attention_alignment_per_sample(six[:, :2],
                                                                                                      p[:, :2]))  # fmt: skip


def test_attention_alignment_resamples_targets():
    p16 = torch.softmax(torch.randn(2, 2, 16, 16), -1)
    assert torch.equal(resample_attention(p16, 4), p16)
    p4 = resample_attention(p16, 2)
    assert p4.shape == (2, 2, 4, 4) and (p4 >= 0).all()
    torch.testing.assert_close(p4.sum(-1), torch.ones(2, 2, 4))
    # a map that attends uniformly everywhere stays uniform on any grid
    torch.testing.assert_close(
        resample_attention(torch.full((1, 1, 16, 16), 1 / 16), 2), torch.full((1, 1, 4, 4), 0.25)
    )
    loss = attention_alignment_per_sample(torch.zeros(2, 2, 4, 4), p16)
    assert loss.shape == (2,) and torch.allclose(loss, torch.full((2,), math.log(4)))  # uniform logits: log N
    with pytest.raises(ValueError, match="enable resampling"):
        attention_alignment_per_sample(torch.zeros(2, 2, 4, 4), p16, resample=False)


def test_teacher_time_known_values():
    t, u = torch.tensor([0.5, 0.1, 1.0]), torch.tensor([0.5, 0.9, 0.0])
    torch.testing.assert_close(teacher_time(t, u, 0.2), torch.tensor([0.4, 0.0, 1.0]))  # clamped at 0
    steps = teacher_time(torch.tensor([500, 20, 3]), torch.tensor([0.5, 0.99, 0.5]), 0.1, 1000)
    assert steps.tolist() == [450, 1, 1]  # t - floor(u * 100), clamped to [1, T - 1] (DiT-SRA)


def test_self_alignment_known_values_and_no_teacher_grad():
    s = torch.randn(2, 5, 8, requires_grad=True)
    torch.testing.assert_close(self_alignment_per_sample(s, s.detach() * 3), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(self_alignment_per_sample(s, -s.detach()), torch.full((2,), 2.0))
    a, b = torch.zeros(1, 1, 2), torch.tensor([[[0.01, 1.0]]])  # Huber beta 0.05: 0.5 d^2 / beta, or |d| - beta / 2
    assert self_alignment_per_sample(a, b, "smooth_l1").item() == pytest.approx((0.5 * 0.01**2 / 0.05 + 0.975) / 2)
    teacher = torch.randn(2, 5, 8, requires_grad=True)
    self_alignment_per_sample(s, teacher).sum().backward()
    assert s.grad is not None and teacher.grad is None
    with pytest.raises(ValueError, match="unknown self-alignment"):
        self_alignment_per_sample(s, teacher, "l1")


def _batch(model, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    y = torch.randint(0, 5, (batch,), generator=g)
    targets = [torch.randn(batch, 16, 16, generator=g)]
    return x, y, targets


def test_repa_loss_family_off_is_bit_identical():
    model = tiny()
    x, y, targets = _batch(model)
    plain = RepaLoss()
    configured = RepaLoss(attn_coeff=0.9, attn_pairs=[(1, 1)], class_token_coeff=0.3, class_token_align=False,
                          self_align_coeff=0.7, self_align_blocks=(1, 2), self_align_gap=0.5, self_align_kind="smooth_l1")  # fmt: skip
    for loss_kwargs in ({}, {"per_sample": True}):
        torch.manual_seed(5)
        a = plain(model, x, y, targets, **loss_kwargs)
        torch.manual_seed(5)
        b = configured(model, x, y, targets, align_weight=1.0, **loss_kwargs)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for diffusion in ("ddpm",):
        dit = tiny("DiT-T/2")
        torch.manual_seed(6)
        a = RepaLoss(diffusion=diffusion)(dit, x, y, targets)
        torch.manual_seed(6)
        b = RepaLoss(diffusion=diffusion, attn_coeff=2.0)(dit, x, y, targets, align_weight=1.0)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_repa_loss_schedule_weight_and_spatial_norm():
    model = tiny().eval()  # no random label dropout between the calls compared
    x, y, targets = _batch(model)
    t, noise = torch.rand(3), torch.randn_like(x)
    base = RepaLoss()(model, x, y, targets, t=t, noise=noise)
    half = RepaLoss()(model, x, y, targets, t=t, noise=noise, align_weight=0.5)
    torch.testing.assert_close(half["total"], base["denoise"] + 0.5 * 0.5 * base["align"])
    off = RepaLoss()(model, x, y, targets, t=t, noise=noise, align_weight=0.0)
    torch.testing.assert_close(off["total"], base["denoise"])
    assert off["align"] == 0.0 and off["align/0"] == 0.0  # weight 0: not computed, logged as 0
    normed = RepaLoss(spatial_norm_gamma=0.6)(model, x, y, targets, t=t, noise=noise)
    zs = model(get_path("linear").interpolate(x, noise, t), t, y)[1]
    expected = alignment_per_sample(zs[0], spatial_norm(targets[0], 0.6)).mean()
    torch.testing.assert_close(normed["align"], expected)
    assert not torch.equal(normed["align"], base["align"])


def test_schedule_weight_zero_skips_the_terms_with_the_same_gradients():
    """HASTE after its stop: no targets or attention maps are needed, the projector still gets a (zero) gradient, and
    every gradient equals that of the computed terms times 0 (align_coeff 0 and attn_coeff 0)."""
    x, y, targets = _batch(tiny())
    t, noise = torch.rand(3), torch.randn_like(x)
    attn = {9: torch.softmax(torch.randn(3, 2, 16, 16), -1)}

    def grads(loss, *args, **kwargs):
        model = tiny().eval()
        terms = loss(model, x, y, *args, t=t, noise=noise, **kwargs)
        terms["total"].backward()
        return terms, {n: p.grad for n, p in model.named_parameters()}

    computed, ref = grads(RepaLoss(align_coeff=0.0, attn_coeff=0.0, attn_pairs=[(1, 9)]), targets, attn_targets=attn)
    for args, kwargs in (((None,), {"attn_targets": {}}), ((targets,), {"attn_targets": attn})):
        idle, got = grads(RepaLoss(attn_pairs=[(1, 9)]), *args, align_weight=0.0, **kwargs)
        assert idle["align_attn"] == 0.0 and idle["align"] == 0.0
        torch.testing.assert_close(idle["total"], computed["denoise"])
        assert got.keys() == ref.keys()
        projector = [n for n in got if n.startswith("projectors")]
        assert projector and all(got[n] is not None and not got[n].any() for n in projector)
        for n in got:  # block 1 runs the fused attention instead of the explicit one: equal up to rounding
            torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-5, msg=n)
    idle, got = grads(RepaLoss(), None, align_weight=0.0)
    computed, ref = grads(RepaLoss(align_coeff=0.0), targets)
    assert torch.equal(idle["total"], computed["total"])
    assert all(torch.equal(got[n], ref[n]) for n in got)  # no attention term: bit for bit


def test_repa_loss_attention_alignment_term():
    model = tiny().eval()
    x, y, targets = _batch(model)
    t, noise = torch.rand(3), torch.randn_like(x)
    attn = {9: torch.softmax(torch.randn(3, 2, 16, 16), -1), 10: torch.softmax(torch.randn(3, 2, 16, 16), -1)}
    loss = RepaLoss(attn_coeff=0.5, attn_pairs=[(1, 9), (3, 10)])
    terms = loss(model, x, y, targets, t=t, noise=noise, attn_targets=attn, align_weight=0.25, per_sample=True)
    _, _, extras = model(get_path("linear").interpolate(x, noise, t), t, y, attn_blocks=[1, 3])
    expected = (attention_alignment_per_sample(extras["attn"][1], attn[9])
                + attention_alignment_per_sample(extras["attn"][3], attn[10])) / 2  # fmt: skip
    torch.testing.assert_close(terms["align_attn/per_sample"], expected)
    torch.testing.assert_close(
        terms["total"], terms["denoise"] + 0.25 * (0.5 * terms["align"] + 0.5 * terms["align_attn"])
    )
    model.zero_grad()
    RepaLoss(align_coeff=0.0, attn_pairs=[(1, 9)])(model, x, y, None, t=t, noise=noise, attn_targets=attn)[
        "align_attn"
    ].backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and model.blocks[1].attn.qkv.weight.grad is None
    with pytest.raises(ValueError, match="no maps for"):
        RepaLoss(attn_pairs=[(1, 11)])(model, x, y, targets, attn_targets=attn)


def test_repa_loss_class_token_draw_order_and_terms():
    model = tiny(class_token_dim=16).eval()
    x, y, targets = _batch(model)
    cls = torch.randn(3, 16)
    loss = RepaLoss(class_token_coeff=0.03)
    torch.manual_seed(11)
    terms = loss(model, x, y, targets, class_tokens=cls, per_sample=True)
    torch.manual_seed(11)
    t = torch.rand(3)  # REG's order: t, image noise, then class-token noise
    noise = torch.randn_like(x)
    noise_cls = torch.randn_like(cls)
    path = get_path("linear")
    out, zs, extras = model(path.interpolate(x, noise, t), t, y, cls_t=path.interpolate(cls, noise_cls, t[:, None]))
    cls_target = noise_cls - cls  # linear path: v = noise - x
    torch.testing.assert_close(terms["class_token/per_sample"], ((extras["class_token"] - cls_target) ** 2).mean(1))
    patch = alignment_per_sample(zs[0], targets[0])
    cos = F.cosine_similarity(extras["class_token_zs"][0], cls, dim=-1)
    torch.testing.assert_close(terms["align/per_sample"], (16 * patch - cos) / 17)  # REG: N + 1 aligned tokens
    torch.testing.assert_close(terms["total"], terms["denoise"] + 0.5 * terms["align"] + 0.03 * terms["class_token"])
    no_align = RepaLoss(class_token_align=False)(model, x, y, targets, t=t, noise=noise, class_tokens=cls,
                                                 noise_cls=noise_cls)  # fmt: skip
    torch.testing.assert_close(no_align["align"], patch.mean())
    terms["total"].backward()
    assert (
        model.class_token_head.weight.grad.abs().sum() > 0 and model.class_token_embedder.proj.weight.grad is not None
    )
    ddpm = RepaLoss(diffusion="ddpm")(tiny("DiT-T/2", class_token_dim=16), x, y, targets, class_tokens=cls)
    assert torch.isfinite(ddpm["class_token"]) and torch.isfinite(ddpm["total"])


@pytest.mark.parametrize("diffusion", ["flow", "ddpm"])
def test_repa_loss_self_alignment(diffusion):
    name = "SiT-T/2" if diffusion == "flow" else "DiT-T/2"
    model = tiny(name, self_align=True, encoder_dims=[])  # usable with no encoder at all
    teacher = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01)
    x, y, _ = _batch(model)
    drop = torch.tensor([0, 1, 0])
    loss = RepaLoss(diffusion=diffusion, self_align_blocks=(1, 3), self_align_gap=0.2)
    torch.manual_seed(21)
    terms = loss(model, x, y, None, teacher=teacher, model_kwargs={"force_drop_ids": drop}, per_sample=True)
    torch.manual_seed(21)
    t = torch.rand(3) if diffusion == "flow" else torch.randint(0, 1000, (3,))
    u = torch.rand(3)  # SRA's order: t, the gap's draw, then noise
    noise = torch.randn_like(x)
    if diffusion == "flow":
        x_t, t_model = get_path("linear").interpolate(x, noise, t), t
        t_tea = teacher_time(t, u, 0.2)
        x_tea, t_tea_model = get_path("linear").interpolate(x, noise, t_tea), t_tea
    else:
        d = loss.ddpm
        x_t, t_model = d.q_sample(x, t, noise), d.model_time(t)
        t_tea = teacher_time(t, u, 0.2, 1000)
        x_tea, t_tea_model = d.q_sample(x, t_tea, noise), d.model_time(t_tea)
    _, _, extras = model(x_t, t_model, y, self_align_block=1, force_drop_ids=drop, project=False)
    hidden = teacher.forward_hidden(x_tea, t_tea_model, y, [3], force_drop_ids=drop)[3]
    torch.testing.assert_close(terms["self_align/per_sample"], self_alignment_per_sample(extras["self_align"], hidden))
    torch.testing.assert_close(terms["total"], terms["denoise"] + 0.5 * terms["self_align"])
    terms["total"].backward()
    assert model.self_align_head[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())  # the teacher receives no gradient
    with pytest.raises(ValueError, match="self_align=True"):
        loss(tiny(name, encoder_dims=[]), x, y, None, teacher=teacher)


@pytest.mark.parametrize("diffusion, kind", [("flow", "ntxent"), ("ddpm", "cos")])
def test_irepa_with_conv_resampling_ntxent_and_ddpm(diffusion, kind):
    name = "SiT-T/2" if diffusion == "flow" else "DiT-T/2"
    model = tiny(name, projector="conv", encoder_dims=[16, 8], randomize=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0, 3])
    targets = [torch.randn(2, 64, 16, generator=g), torch.randn(2, 16, 8, generator=g)]  # 8x8 grid -> model's 4x4
    loss = RepaLoss(diffusion=diffusion, align_kind=kind, spatial_norm_gamma=0.6)
    terms = loss(model, x, y, targets, generator=torch.Generator().manual_seed(1))
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    assert model.projectors[0].conv.weight.grad.abs().sum() > 0 and model.projectors[1].conv.weight.grad.abs().sum() > 0


def test_all_options_together():
    model = tiny(projector="conv", class_token_dim=16, self_align=True)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    x, y, targets = _batch(model)
    attn = {1: torch.softmax(torch.randn(3, 2, 64, 64), -1)}  # an 8x8 encoder grid, resampled to 4x4
    loss = RepaLoss(spatial_norm_gamma=0.6, attn_pairs=[(2, 1)], self_align_blocks=(1, 3))
    terms = loss(model, x, y, targets, attn_targets=attn, class_tokens=torch.randn(3, 16), teacher=teacher,
                 align_weight=align_weight(3, "cosine", stop_step=10), generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert {"align_attn", "class_token", "self_align"} <= set(terms)
    terms["total"].backward()
    assert all(torch.isfinite(v) for v in terms.values())


# ============================================================================================== samplers


def _joint_fn(c: float, c_uncond: float | None = None):
    """Image velocity = x (a fixed linear field) and a constant class-token velocity (c, or c_uncond for null)."""

    def fn(x_t, cls_t, t, y):
        v_cls = torch.full_like(cls_t, c)
        if c_uncond is not None:
            v_cls = torch.where((y == 5)[:, None], torch.full_like(cls_t, c_uncond), v_cls)
        return x_t * 0.5, v_cls

    return fn


def test_joint_sampling_generates_and_drops_the_class_token():
    noise, cls_noise, y = torch.randn(2, 4, 8, 8), torch.randn(2, 12), torch.tensor([0, 1])
    plain = euler_sampler(lambda x, t, y: x * 0.5, noise, y, num_steps=6, heun=True)
    joint = euler_sampler(_joint_fn(0.3), noise, y, num_steps=6, heun=True, cls_noise=cls_noise)
    assert isinstance(joint, torch.Tensor) and torch.equal(joint, plain)  # the class token is dropped at the end
    img, cls = euler_sampler(_joint_fn(0.3), noise, y, num_steps=6, cls_noise=cls_noise, return_class_token=True)
    torch.testing.assert_close(cls, cls_noise.double() - 0.3)  # x_0 = x_1 - integral of a constant velocity
    # CFG on the class token: d = d_uncond + s (d_cond - d_uncond) inside the interval; s <= 0: conditional only
    for scale, expected in [(None, -1.0 + 3.0 * (0.3 + 1.0)), (2.0, -1.0 + 2.0 * 1.3), (0.0, 0.3)]:
        _, cls = euler_sampler(_joint_fn(0.3, -1.0), noise, y, num_steps=4, cfg_scale=3.0, null_label=5,
                               cls_noise=cls_noise, cls_cfg_scale=scale, return_class_token=True)  # fmt: skip
        torch.testing.assert_close(cls, cls_noise.double() - expected)
    with pytest.raises(ValueError, match="needs cls_noise"):
        euler_sampler(lambda x, t, y: x, noise, y, num_steps=2, return_class_token=True)


def test_joint_sde_matches_the_plain_image_path_and_draws_after_it():
    noise, cls_noise, y = torch.randn(2, 4, 8, 8), torch.randn(2, 12), torch.tensor([0, 1])
    eps = [torch.randn(2, 4, 8, 8) for _ in range(4)]
    cls_eps = [torch.randn(2, 12) for _ in range(4)]
    plain = euler_maruyama_sampler(lambda x, t, y: x * 0.5, noise, y, num_steps=5, eps=eps)
    img, cls = euler_maruyama_sampler(_joint_fn(0.3), noise, y, num_steps=5, eps=eps, cls_noise=cls_noise,
                                      cls_eps=cls_eps, return_class_token=True)  # fmt: skip
    assert torch.equal(img, plain) and cls.shape == (2, 12)
    # global RNG: each step draws the image's noise, then the class token's (REG's order)
    torch.manual_seed(0)
    a = euler_maruyama_sampler(_joint_fn(0.3), noise, y, num_steps=3, cls_noise=cls_noise, return_class_token=True)
    torch.manual_seed(0)
    drawn = [(torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)) for _ in range(2)]
    b = euler_maruyama_sampler(_joint_fn(0.3), noise, y, num_steps=3, eps=[d[0] for d in drawn], cls_noise=cls_noise,
                               cls_eps=[d[1] for d in drawn], return_class_token=True)  # fmt: skip
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cls_eps"):
        euler_maruyama_sampler(_joint_fn(0.3), noise, y, num_steps=3, eps=eps, cls_noise=cls_noise)


def test_joint_sampling_of_a_reg_model():
    model = tiny(class_token_dim=16)
    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    img, cls = euler_maruyama_sampler(model_joint_velocity_fn(model), noise, y, num_steps=3, cfg_scale=2.0,
                                      null_label=5, cls_noise=torch.randn(2, 16), return_class_token=True)  # fmt: skip
    assert img.shape == (2, 4, 8, 8) and cls.shape == (2, 16) and torch.isfinite(img).all()
    with pytest.raises(ValueError, match="cls_t"):
        euler_sampler(model_velocity_fn(model), noise, y, num_steps=2)


# ======================================================================================= spatial structure


def test_lds_hand_computed():
    # 2x2 grid: the top row points along e1, the bottom row along e2
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]])
    # local pairs: 2 horizontal (cos 1), 2 vertical (cos 0) -> 0.5; far (distance 2): both diagonals, cos 0
    assert lds(tokens, far_dist=2) == pytest.approx(0.5)
    assert lds(tokens, (2, 2), far_dist=1) == pytest.approx(0.5 - (2 * 1 + 4 * 0) / 6)
    with pytest.raises(ValueError, match="no token pair"):
        lds(tokens)  # a 2x2 grid has no pair at distance 6
    assert manhattan_distances(2, 3).tolist()[0] == [0, 1, 2, 1, 2, 3]


def test_cds_and_rmsc_hand_computed():
    a, b, c = [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]  # a 1x3 grid: cos(a,b) = cos(b,c) = 1/sqrt2, cos(a,c) = 0
    tokens = torch.tensor([[a, b, c]])
    # mean cosine at d = 1 is 1/sqrt2, at d = 2 it is 0: slope -1/sqrt2, CDS = 1/sqrt2
    assert cds(tokens, (1, 3)) == pytest.approx(1 / math.sqrt(2))
    assert rmsc(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])) == pytest.approx(math.sqrt(0.5))
    assert rmsc(torch.ones(2, 4, 3)) == pytest.approx(0.0, abs=1e-12)


def test_smooth_grid_scores_higher_than_shuffled_tokens():
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    freqs = torch.rand(32, generator=g) * 0.4
    phase = torch.rand(32, generator=g) * 6.28
    smooth = torch.sin(rows.flatten()[:, None] * freqs + phase) + torch.cos(cols.flatten()[:, None] * freqs.flip(0))
    smooth = (smooth + 0.1 * torch.randn(256, 32, generator=g))[None].repeat(3, 1, 1)
    shuffled = smooth[:, torch.randperm(256, generator=g)]
    good, bad = spatial_metrics(smooth), spatial_metrics(shuffled)
    assert good["lds"] > 0.2 and abs(bad["lds"]) < 0.05 and good["lds"] > bad["lds"]
    assert good["cds"] > bad["cds"]
    assert good["rmsc"] == pytest.approx(bad["rmsc"])  # a permutation keeps the contrast
    with pytest.raises(ValueError, match="not a square grid"):
        lds(torch.randn(1, 6, 4))


def test_family_terms_are_fp32_under_autocast():
    model = tiny(projector="conv", class_token_dim=16, self_align=True)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    x, y, targets = _batch(model)
    attn = {1: torch.softmax(torch.randn(3, 2, 16, 16), -1)}
    loss = RepaLoss(spatial_norm_gamma=0.6, attn_pairs=[(2, 1)], self_align_blocks=(1, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss(model, x, y, [targets[0].bfloat16()], attn_targets=attn, class_tokens=torch.randn(3, 16),
                     teacher=teacher, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
