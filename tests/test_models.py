"""repa.models: golden parity with the official REPA SiT, registry, sizes, compute, errors and options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from repa.models import MODELS, DiffusionTransformer, build_model, count_params, forward_flops, forward_macs
from repa.models.layers import Attention

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
TINY = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5, projector_dim=24)


def golden_model() -> DiffusionTransformer:
    """The fixture's architecture (case.json `constructor`), official init."""
    c = json.loads((GOLDEN / "case.json").read_text())["constructor"]
    assert c["decoder_hidden_size"] == c["hidden_size"]
    return DiffusionTransformer(
        input_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
        hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
        num_classes=c["num_classes"], class_dropout_prob=c["class_dropout_prob"], align_depth=c["encoder_depth"],
        encoder_dims=c["z_dims"], projector_dim=c["projector_dim"], qk_norm=c["qk_norm"],
    )  # fmt: skip


def tiny(name: str = "SiT-T/2", **overrides) -> DiffusionTransformer:
    return build_model(name, **{**TINY, "encoder_dims": [16], "align_depth": 1, **overrides})


def inputs(model: DiffusionTransformer, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = model.input_size
    x_t = torch.randn(batch, model.in_channels, s, s, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x_t, t, y


def randomize(model: DiffusionTransformer, seed: int = 0) -> DiffusionTransformer:
    """Non-zero adaLN and final layer, so every part of the network affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# ----------------------------------------------------------------------------------------------- golden


@pytest.mark.parametrize("weights", ["model.safetensors", "model.pt"])
def test_golden_forward(weights):
    model = golden_model()
    fresh_pos = model.pos_embed.clone()
    if weights.endswith(".pt"):
        state = torch.load(GOLDEN / weights, map_location="cpu", weights_only=True)
    else:
        state = load_file(GOLDEN / weights)
    model.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh_pos, state["pos_embed"], rtol=0, atol=1e-6)  # our sin-cos == theirs
    f = load_file(GOLDEN / "forward.safetensors")
    with torch.no_grad():
        out, zs = model.eval()(f["x_t"], f["t"], f["y"])
    assert out.shape == f["out"].shape and len(zs) == 1
    torch.testing.assert_close(out, f["out"], rtol=0, atol=1e-5)
    torch.testing.assert_close(zs[0], f["zs_0"], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.velocity(f["x_t"], f["t"], f["y"]), f["out"], rtol=0, atol=1e-5)


def test_golden_train_mode_label_dropout_replays_the_reference_rng():
    """Train mode: the loss draws t then noise, then the model's label dropout is the 3rd draw, rand(B)."""
    case = json.loads((GOLDEN / "case.json").read_text())["loss"]
    seed = 2004
    assert f"seed {seed}" in case["random_draws_train"]
    L = load_file(GOLDEN / "loss.safetensors")
    model = golden_model()
    model.load_state_dict(load_file(GOLDEN / "model.safetensors"), strict=True)
    x, y = L["x"], L["y"]
    torch.manual_seed(seed)
    t = torch.rand(4, 1, 1, 1)
    noise = torch.randn_like(x)
    torch.testing.assert_close(t.flatten(), L["train_t"], rtol=0, atol=0)
    x_t = (1 - t) * x + t * noise
    with torch.no_grad():
        v_pred, _ = model.train()(x_t, t.flatten(), y)
    denoise = ((v_pred - (noise - x)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(denoise, L["train_denoise_per_sample"], rtol=0, atol=1e-5)
    # The same labels forced in eval mode give the same prediction.
    drop = (L["train_label_drop_u"] < 0.1).long()
    assert torch.equal(torch.where(drop.bool(), 10, y), L["train_y_effective"])
    with torch.no_grad():
        v_forced, _ = model.eval()(x_t, t.flatten(), y, force_drop_ids=drop)
    torch.testing.assert_close(v_forced, v_pred, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- registry


def test_registry_names_and_families():
    for family in ("SiT", "DiT"):
        for size in ("T", "S", "B", "L", "XL"):
            for patch in (1, 2, 4, 8):
                kwargs = MODELS[f"{family}-{size}/{patch}"]
                assert kwargs["patch_size"] == patch
                assert kwargs["learn_sigma"] is (family == "DiT")
    assert len(MODELS) == 40
    assert MODELS["SiT-XL/2"]["align_depth"] == 8 and MODELS["SiT-L/2"]["align_depth"] == 8
    assert MODELS["SiT-B/2"]["align_depth"] == 4
    s2 = MODELS["SiT-S/2"]
    assert (s2["hidden_size"], s2["depth"], s2["num_heads"]) == (384, 12, 6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_entry_runs_forward_and_backward_at_tiny_width(name):
    torch.manual_seed(0)
    model = tiny(name)
    x_t, t, y = inputs(model, batch=2)
    out, zs = model(x_t, t, y)
    c_out = 8 if MODELS[name]["learn_sigma"] else 4
    assert out.shape == (2, c_out, 8, 8)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero init: the final layer starts at zero
    assert [z.shape for z in zs] == [(2, (8 // model.patch_size) ** 2, 16)]
    (out.sum() + zs[0].square().mean()).backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert model.projectors[0][0].weight.grad.abs().sum() > 0


def test_full_size_parameter_counts_match_the_papers():
    expected = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}  # DiT Table 1 / SiT Table 1
    for family in ("SiT", "DiT"):
        for size, count in expected.items():
            with torch.device("meta"):
                model = build_model(f"{family}-{size}/2", encoder_dims=[768])
            n = count_params(model)
            assert abs(n - count) / count < 0.01, (family, size, n)
            P, D = 2048, model.hidden_size
            projector = D * P + P + P * P + P + P * 768 + 768
            assert count_params(model, include_projectors=True) == n + projector


def test_sit_s_builds_and_runs():
    """The official code crashes here (final layer sized 768 for a 384-wide model)."""
    model = build_model("SiT-S/2", input_size=4, depth=1, align_depth=1, encoder_dims=[8], projector_dim=16)
    out, zs = model(*inputs(model, batch=1))
    assert out.shape == (1, 4, 4, 4) and zs[0].shape == (1, 4, 8)


# ----------------------------------------------------------------------------------------------- compute


def test_forward_macs_match_dit_paper_gflops():
    # DiT Table 4 "Gflops" (fvcore: one multiply-add = one flop) at 256 px (32x32x4 latents).
    paper = {"S/2": 6.06, "B/2": 23.01, "L/2": 80.71, "XL/2": 118.64, "XL/4": 29.05, "XL/8": 7.39}
    for name, gmacs in paper.items():
        with torch.device("meta"):
            model = build_model(f"DiT-{name}")
        assert forward_macs(model) / 1e9 == pytest.approx(gmacs, rel=5e-3), name
        assert forward_flops(model, batch=3) == 6 * forward_macs(model)


def test_forward_flops_agree_with_torch_flop_counter():
    model = tiny("DiT-T/2", encoder_dims=[16, 8])
    x_t, t, y = inputs(model, batch=2)
    with FlopCounterMode(display=False) as counter:
        model(x_t, t, y)
    ours = forward_flops(model, batch=2, include_projectors=True)
    N, D = model.num_patches, model.hidden_size
    attention = 2 * 2 * model.depth * 2 * N * N * D  # Q K^T and A V; CPU SDPA is not seen by the counter
    assert counter.get_total_flops() in (ours, ours - attention)


# -------------------------------------------------------------------------------------------------- errors


def test_constructor_errors_are_clear():
    with pytest.raises(ValueError, match="align_depth=3"):
        tiny(align_depth=3)
    with pytest.raises(ValueError, match="align_depth=0"):
        tiny(align_depth=0)
    tiny(align_depth=30, encoder_dims=[])  # no projectors: align_depth unused
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        tiny(num_heads=3)
    with pytest.raises(ValueError, match="input_size=10 is not divisible by patch_size=4"):
        tiny("SiT-T/4", input_size=10)
    with pytest.raises(ValueError, match="SiT-XL/2"):
        build_model("SiT-XL2")
    with pytest.raises(ValueError, match="Valid names"):
        build_model("UNet")


def test_forward_input_errors_are_clear():
    model = tiny()
    x_t, t, y = inputs(model, batch=2)
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 4, 8, 8\), got \(2, 3, 8, 8\)"):
        model(x_t[:, :3], t, y)
    with pytest.raises(ValueError, match=r"got \(2, 4, 16, 16\)"):
        model(F.interpolate(x_t, scale_factor=2), t, y)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x_t, t[:1], y)
    with pytest.raises(ValueError, match="y must have shape"):
        model(x_t, t, y[:1])
    with pytest.raises(ValueError, match="integer class labels"):
        model(x_t, t, y.float())
    with pytest.raises(ValueError, match="layers must be in"):
        model.forward_hidden(x_t, t, y, [3])


# ------------------------------------------------------------------------------------------------- options


def test_qk_norm_matches_a_plain_reference_and_trains():
    attn = Attention(32, 2, qk_norm=True)
    assert {"q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"} <= set(attn.state_dict())
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    ref = ((q @ k.transpose(-1, -2)) / math.sqrt(16)).softmax(-1) @ v
    torch.testing.assert_close(attn(x), attn.proj(ref.transpose(1, 2).reshape(2, 5, 32)))
    model = tiny(qk_norm=True)
    out, zs = model(*inputs(model))
    (out.sum() + zs[0].sum()).backward()
    assert model.blocks[0].attn.q_norm.weight.grad is not None


def test_train_mode_label_dropout_equals_forced_drop():
    model = randomize(tiny(class_dropout_prob=0.5))
    x_t, t, y = inputs(model, batch=8)
    torch.manual_seed(7)
    drop = torch.rand(8) < 0.5
    assert drop.any() and not drop.all()
    torch.manual_seed(7)
    out_train, _ = model.train()(x_t, t, y)
    out_forced, _ = model.eval()(x_t, t, y, force_drop_ids=drop.long())
    out_null, _ = model.eval()(x_t, t, torch.where(drop, model.num_classes, y))
    torch.testing.assert_close(out_train, out_forced, rtol=0, atol=0)
    torch.testing.assert_close(out_forced, out_null, rtol=0, atol=0)
    state = torch.random.get_rng_state()
    model.eval()(x_t, t, y)  # eval mode draws nothing
    model.train()(x_t, t, y, force_drop_ids=drop)  # nor does a forced drop
    assert torch.equal(state, torch.random.get_rng_state())


def test_no_dropout_has_no_null_row():
    model = tiny(class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.num_embeddings == model.num_classes
    x_t, t, y = inputs(model, batch=2)
    model.train()(x_t, t, y)
    with pytest.raises(ValueError, match="null class"):
        model(x_t, t, y, force_drop_ids=torch.ones(2))


def test_project_false_skips_the_projectors():
    model = tiny(encoder_dims=[16, 8])
    calls = []
    for proj in model.projectors:
        proj.register_forward_hook(lambda *_: calls.append(1))
    x_t, t, y = inputs(model)
    out, zs = model(x_t, t, y, project=False)
    assert zs == [] and calls == []
    model.velocity(x_t, t, y)
    assert calls == []
    _, zs = model(x_t, t, y)
    assert len(zs) == 2 and len(calls) == 2
    _, zs = tiny(encoder_dims=[])(x_t, t, y)
    assert zs == []


def test_forward_hidden_and_velocity_are_consistent_with_forward():
    model = randomize(tiny("DiT-T/2", depth=3, align_depth=2)).eval()
    x_t, t, y = inputs(model)
    with torch.no_grad():
        out, zs = model(x_t, t, y)
        hidden = model.forward_hidden(x_t, t, y, [0, 2, 3])
    assert sorted(hidden) == [0, 2, 3] and hidden[3].shape == (3, 16, 32)
    torch.testing.assert_close(hidden[0], model.x_embedder(x_t) + model.pos_embed)
    torch.testing.assert_close(model.projectors[0](hidden[2]), zs[0])
    c = model.t_embedder(t) + model.y_embedder(y, False)
    torch.testing.assert_close(model.unpatchify(model.final_layer(hidden[3], c)), out)
    v = model.velocity(x_t, t, y)
    assert v.shape == (3, 4, 8, 8)
    torch.testing.assert_close(v, out[:, :4])


def test_scalar_t_broadcasts():
    model = randomize(tiny()).eval()
    x_t, _, y = inputs(model)
    out_scalar, _ = model(x_t, torch.tensor(0.3), y)
    out_vector, _ = model(x_t, torch.full((3,), 0.3), y)
    torch.testing.assert_close(out_scalar, out_vector)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = randomize(tiny())
        model.grad_checkpointing = ckpt
        out, zs = model(*inputs(model))
        (out.square().mean() + zs[0].mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_pos_embed_is_a_fixed_buffer_in_the_state_dict():
    model = tiny()
    assert "pos_embed" in model.state_dict()
    assert "pos_embed" not in dict(model.named_parameters())
    assert model.pos_embed.shape == (1, 16, 32)
    # Token (row 1, column 2): first half encodes the column, second half the row (MAE/DiT layout).
    pe = model.pos_embed[0, 1 * 4 + 2]
    omega = 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
    expected = torch.cat([(2 * omega).sin(), (2 * omega).cos(), (1 * omega).sin(), (1 * omega).cos()]).float()
    torch.testing.assert_close(pe, expected)


# ------------------------------------------------------------------------------------- REPA family options


def test_golden_checkpoint_loads_strictly_with_the_family_options_off():
    """Official REPA weights: the family options at their defaults change neither keys nor outputs."""
    model = golden_model()
    assert (
        model.config["projector"] == "mlp" and model.config["class_token_dim"] == 0 and not model.config["self_align"]
    )
    model.load_state_dict(load_file(GOLDEN / "model.safetensors"), strict=True)
    f = load_file(GOLDEN / "forward.safetensors")
    with torch.no_grad():
        out, zs = model.eval()(f["x_t"], f["t"], f["y"], attn_blocks=(), self_align_block=None)
    torch.testing.assert_close(out, f["out"], rtol=0, atol=1e-5)
    torch.testing.assert_close(zs[0], f["zs_0"], rtol=0, atol=1e-5)


def test_family_options_have_their_own_keys_and_round_trip_strictly():
    model = tiny(projector="conv", projector_kernel=5, class_token_dim=16, self_align=True)
    keys = set(model.state_dict())
    assert "projectors.0.conv.weight" in keys and not any(k.startswith("projectors.0.0.") for k in keys)
    assert model.projectors[0].conv.weight.shape == (16, 32, 5, 5)
    assert {"class_token_head.weight", "class_token_embedder.proj.weight", "self_align_head.0.weight"} <= keys
    again = tiny(projector="conv", projector_kernel=5, class_token_dim=16, self_align=True)
    again.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(RuntimeError):
        tiny().load_state_dict(model.state_dict(), strict=True)
    assert "projector='conv'" in repr(model) and "class_token_dim=16" in repr(model)
    with pytest.raises(ValueError, match="first encoder's width"):
        tiny(class_token_dim=8)
    with pytest.raises(ValueError, match="unknown projector"):
        tiny(projector="linear")
    with pytest.raises(ValueError, match="odd"):
        tiny(projector="conv", projector_kernel=4)
    assert count_params(model, include_projectors=True) - count_params(model) == sum(
        p.numel() for p in [*model.projectors.parameters(), *model.self_align_head.parameters()]
    )
