"""Ecosystem items end to end on CPU: the dopri5 and DDIM samplers from the YAML config, the CLI and
`repa.generate.generate` (with the model-kind checks), and EDM2's FD_DINOv2 detector (CLS token of DINOv2-L at
224 px, random weights at tiny width) beside the mean-token encoder detector."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa.config import ConfigError, load_config
from repa.encoders import load_encoder
from repa.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from repa.evaluation.detectors import EncoderClsDetector, EncoderDetector, make_detector

ROOT = Path(__file__).parents[1]
TINY_DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------------ config


def test_sampler_settings_load_from_yaml_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("sample:\n  sampler: dopri5\n  atol: 1.0e-5\n  rtol: 1.0e-4\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.sample.sampler, cfg.sample.atol, cfg.sample.rtol) == ("dopri5", 1e-5, 1e-4)
    default = load_config(None).sample
    assert (default.atol, default.rtol, default.ddim_eta) == (1e-6, 1e-3, 0.0)  # SiT's ODE defaults; DDIM eta 0
    cfg = load_config(None, ["model.name=DiT-B/4", "sample.sampler=ddim", "sample.ddim_eta=0.5"])
    assert (cfg.sample.sampler, cfg.sample.ddim_eta) == ("ddim", 0.5)
    cfg = load_config(None, ["transport.diffusion=ddpm", "sample.sampler=ddim"])
    assert cfg.sample.sampler == "ddim"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sample.sampler=ddim"], r"sample.sampler=ddim samples DDPM models, but model.name=SiT-XL/2 .* flow"),
        (["model.name=DiT-XL/2", "sample.sampler=dopri5"], r"sample.sampler=dopri5 .* model.name=DiT-XL/2 is a DDPM"),
        (["transport.diffusion=ddpm", "sample.sampler=dopri5"], r"transport.diffusion=ddpm is a DDPM"),
        (["sample.sampler=euler"], r"sample.sampler"),
        (["sample.atol=0"], r"sample.atol must be a finite number > 0"),
        (["sample.rtol=-1e-3"], r"sample.rtol must be a finite number > 0"),
        (["sample.rtol=nan"], r"sample.rtol must be a finite number"),
        (["model.name=DiT-B/4", "sample.sampler=ddim", "sample.ddim_eta=1.5"], r"sample.ddim_eta must be in \[0, 1\]"),
    ],
)
def test_sampler_model_mismatches_fail_at_load_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ CLI flags


@pytest.mark.parametrize("command", [["sample", "ckpt"], ["eval", "generate", "ckpt", "--ref", "r.npz"]])
def test_sample_and_eval_generate_share_the_sampler_flags(command):
    from repa.cli.main import build_parser
    from repa.cli.sample import sampling_overrides

    args = build_parser().parse_args(
        [*command, "--sampler", "dopri5", "--atol", "1e-5", "--rtol", "1e-4", "--ddim-eta", "0.3"]
    )
    over = sampling_overrides(args)
    assert over["sampler"] == "dopri5" and (over["atol"], over["rtol"], over["ddim_eta"]) == (1e-5, 1e-4, 0.3)
    plain = sampling_overrides(build_parser().parse_args(command))
    assert plain["atol"] is None and plain["rtol"] is None and plain["ddim_eta"] is None  # keep the run's config
    assert build_parser().parse_args([*command, "--sampler", "ddim"]).sampler == "ddim"


# ------------------------------------------------------------------------------------------- generate


def _tiny_model(learn_sigma: bool):
    """A tiny SiT (or learned-Sigma DiT) whose zero-initialised parameters (adaLN, final layer) are made random, so
    that it predicts a non-zero field."""
    from repa.models import DiffusionTransformer

    torch.manual_seed(0)
    model = DiffusionTransformer(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                 num_classes=10, learn_sigma=learn_sigma, align_depth=1, encoder_dims=[],
                                 projector_dim=32)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if not bool(p.abs().sum()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def test_generate_with_dopri5_for_flow_models():
    pytest.importorskip("torchdiffeq")
    from repa.generate import apply_sample_overrides, generate

    model, labels = _tiny_model(False), torch.tensor([0, 3])
    cfg = load_config(None, ["sample.sampler=dopri5", "sample.rtol=1e-2", "sample.atol=1e-4", "sample.cfg_scale=1.5"])
    x = generate(model, cfg, labels, (4, 8, 8), seed=1)
    assert x.shape == (2, 4, 8, 8) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    torch.testing.assert_close(generate(model, cfg, labels, (4, 8, 8), seed=1), x)  # deterministic given the seed
    # the same ODE as Heun's: tight tolerances agree with Heun (4e-5 measured at 20 steps), far closer than Euler
    tight = generate(model, load_config(None, ["sample.sampler=dopri5", "sample.rtol=1e-5", "sample.atol=1e-5"]),
                     labels, (4, 8, 8), seed=1)  # fmt: skip
    heun = load_config(None, ["sample.sampler=ode", "sample.heun=true", "sample.num_steps=20"])
    euler = load_config(None, ["sample.sampler=ode", "sample.num_steps=2"])
    err_heun = (tight - generate(model, heun, labels, (4, 8, 8), seed=1)).abs().max().item()
    assert err_heun < 2e-4 and err_heun < (tight - generate(model, euler, labels, (4, 8, 8), seed=1)).abs().max() / 5
    apply_sample_overrides(cfg, {"sampler": "ddim"})  # an override after load: refused when sampling starts
    with pytest.raises(ConfigError, match="sample.sampler=ddim samples DDPM models"):
        generate(model, cfg, labels, (4, 8, 8), seed=1)


def test_generate_with_ddim_for_ddpm_models():
    from repa.generate import apply_sample_overrides, generate

    model, labels = _tiny_model(True), torch.tensor([0, 3])
    cfg = load_config(None, ["model.name=DiT-B/4", "sample.sampler=ddim", "sample.num_steps=5"])
    x = generate(model, cfg, labels, (4, 8, 8), seed=1)
    assert x.shape == (2, 4, 8, 8) and bool(torch.isfinite(x).all())
    torch.testing.assert_close(generate(model, cfg, labels, (4, 8, 8), seed=1), x)
    ancestral = load_config(None, ["model.name=DiT-B/4", "sample.sampler=sde", "sample.num_steps=5"])
    assert not torch.allclose(generate(model, ancestral, labels, (4, 8, 8), seed=1), x)  # DDIM is not ancestral
    apply_sample_overrides(cfg, {"ddim_eta": 1.0})
    assert not torch.allclose(generate(model, cfg, labels, (4, 8, 8), seed=1), x)
    apply_sample_overrides(cfg, {"sampler": "dopri5"})
    with pytest.raises(ConfigError, match="sample.sampler=dopri5 .* is a DDPM"):
        generate(model, cfg, labels, (4, 8, 8), seed=1)


def test_repa_sample_cli_with_dopri5_and_a_refused_ddim(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchdiffeq")
    from repa.cli.main import main
    from repa.training import train
    from tests.helpers.tiny import tiny_overrides, write_idx_dataset

    data = write_idx_dataset(tmp_path / "data" / "fashion-mnist", num=16)
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    over = tiny_overrides(run, data, "train.max_steps=1", "train.checkpoint_every=1")
    train(load_config(ROOT / "configs" / "tiny-vanilla.yaml", over))
    out = tmp_path / "samples"
    argv = ["sample", str(run), "--num", "2", "--batch-size", "2", "--out", str(out), "--sampler", "dopri5",
            "--rtol", "1e-2", "--atol", "1e-3"]  # fmt: skip
    assert main(argv) == 0
    assert len(list(out.glob("*dopri5*.npz"))) == 1
    capsys.readouterr()
    assert main(["sample", str(run), "--num", "2", "--out", str(out), "--sampler", "ddim"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sample.sampler=ddim samples DDPM models" in err[0]


# ------------------------------------------------------------------------------------- FD_DINOv2 (EDM2)


def _tiny_dinov2_l(resolution: int = 224):
    return load_encoder("dinov2-vit-l", resolution, random_init=True, config_overrides=TINY_DINO)


def _images(n: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _edm2_pixels(images: torch.Tensor) -> torch.Tensor:
    """EDM2's DINOv2Detector, resize_mode='torch': bicubic antialiased resize of [0, 255] floats, /255, ImageNet."""
    x = F.interpolate(images.to(torch.float32), size=(224, 224), mode="bicubic", antialias=True) / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _hub_position_table(model, grid: int) -> torch.Tensor:
    """torch-hub DINOv2's interpolate_pos_encoding (interpolate_offset 0.1, no antialias), written out here."""
    table = model.embeddings.position_embeddings.float()
    m, dim = int(math.sqrt(table.shape[1] - 1)), table.shape[-1]
    patches = F.interpolate(table[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                            scale_factor=((grid + 0.1) / m, (grid + 0.1) / m))  # fmt: skip
    return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def test_fd_dinov2_detector_is_the_cls_token_with_edm2_preprocessing():
    import copy

    enc = _tiny_dinov2_l()
    hf_model = copy.deepcopy(enc.model)  # transformers' own position resampling, before the detector patches it
    det = EncoderClsDetector(enc)
    assert det.name == "encoder-cls/dinov2-vit-l/224/edm2-torch"
    images = _images()
    feats = det.features(images)["pool"]
    assert feats.shape == (3, 32) and feats.dtype == torch.float32
    # the model's pooled CLS output (final norm) on EDM2's pixels, with the hub's position table
    pixels = _edm2_pixels(images)
    torch.testing.assert_close(feats, enc.model(pixel_values=pixels).pooler_output)
    table = enc.model.embeddings.interpolate_pos_encoding(torch.zeros(1, 257, 32), 224, 224)
    torch.testing.assert_close(table, _hub_position_table(enc.model, 16))
    assert table.shape == (1, 257, 32)  # 37x37 -> 16x16
    assert not torch.allclose(table, hf_model.embeddings.interpolate_pos_encoding(torch.zeros(1, 257, 32), 224, 224))
    assert (feats - hf_model(pixel_values=pixels).pooler_output).abs().max() > 1e-5  # the hub's table matters
    # the mean-token detector differs (another feature of the same network)
    mean_det = EncoderDetector(_tiny_dinov2_l())
    assert mean_det.name == "encoder/dinov2-vit-l/224/mean" != det.name
    assert (mean_det.features(images)["pool"] - feats).abs().max() > 1e-3
    # dgm-eval's PIL reference resize: uint8 again after a PIL bicubic resize, close to the torch one
    pil = EncoderClsDetector(_tiny_dinov2_l(), resize="pil")
    from PIL import Image

    arr = np.stack([np.asarray(Image.fromarray(a, "RGB").resize((224, 224), Image.Resampling.BICUBIC))
                    for a in images.permute(0, 2, 3, 1).numpy()])  # fmt: skip
    torch.testing.assert_close(pil.preprocess(images), torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255)
    assert pil.name.endswith("edm2-pil")
    with pytest.raises(ValueError, match="uint8"):
        det.features(images.float())


def test_make_detector_names(monkeypatch):
    made = []

    def fake_load(name, resolution=224, **kwargs):
        over = TINY_DINO if name.startswith("dinov2") else dict(TINY_DINO, intermediate_size=64)
        made.append((name, resolution))
        return load_encoder(name, resolution, random_init=True, config_overrides=over)

    monkeypatch.setattr("repa.encoders.load_encoder", fake_load)
    det = make_detector("fd_dinov2")
    assert isinstance(det, EncoderClsDetector) and made[-1] == ("dinov2-vit-l", 224)
    assert det.name == "encoder-cls/dinov2-vit-l/224/edm2-torch" and det.resize == "torch"
    assert make_detector("fd_dinov2-pil").resize == "pil"
    assert make_detector("encoder-cls:dinov3-vit-b").name == "encoder-cls/dinov3-vit-b/224/edm2-torch"
    assert make_detector("encoder:dinov2-vit-l").name == "encoder/dinov2-vit-l/224/mean"
    with pytest.raises(ValueError, match="has no CLS token"):
        make_detector("encoder-cls:siglip-vit-b")
    with pytest.raises(ValueError, match="fd_dinov2"):
        make_detector("dinov2")


def test_fd_dinov2_name_in_the_metrics_json(tmp_path):
    from repa.data.npz import save_samples
    from repa.evaluation import score

    det = EncoderClsDetector(_tiny_dinov2_l())
    ref = tmp_path / "ref.npz"
    save_samples(ref, _images(6, 32, seed=1).permute(0, 2, 3, 1).numpy())
    metrics = score([_images(6, 32, seed=2)], ref, det, batch_size=3, out_json=tmp_path / "m.json", progress=False)
    assert metrics["detector"] == "encoder-cls/dinov2-vit-l/224/edm2-torch" and np.isfinite(metrics["fid"])
    assert "encoder-cls/dinov2-vit-l/224/edm2-torch" in (tmp_path / "m.json").read_text()
