"""Latent normalisation x = (z - shift) * scale: the rules that read it from a diffusers VAE config (SD-VAE, SD3 /
FLUX.1 scale + shift, per-channel latents_mean / latents_std), its exact inverse, SD-VAE's bit-identical default,
the 16-channel SD3 / FLUX.1 presets, and `repa prepare --latent-norm {vae,dataset}` -> one training step -> sampling
decoded with the inverse normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repa.cli.main import main as cli_main
from repa.config import load_config
from repa.data.shard_writer import run_config
from repa.data.shards import LatentShards, ShardError, manifest_latent_norm, read_latent_norm
from repa.data.vae import LATENT_SCALE, RANDOM_VAE_PRESETS, VAE, LatentNorm, sample_latents
from repa.data.vae_spec import load_vae
from repa.generate import decoder_for, generate, run_latent_norm

torch.set_num_threads(2)
ROOT = Path(__file__).parents[1]

# What the published configs say (diffusers AutoencoderKL config.json, subfolder vae): FLUX.1, SD3, and a config with
# per-channel latents_mean / latents_std (playground-v2.5's, 4 channels)
FLUX1 = {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "layers_per_block": 2,
         "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "use_quant_conv": False,
         "use_post_quant_conv": False}  # fmt: skip
SD3 = {**FLUX1, "scaling_factor": 1.5305, "shift_factor": 0.0609}
PLAYGROUND = {"scaling_factor": 0.5, "latents_mean": [-1.6574, 1.886, -1.383, 2.5155],
              "latents_std": [8.4927, 5.9022, 6.5498, 5.2299]}  # fmt: skip


def _z(c=16, seed=0):
    return torch.randn(3, c, 4, 5, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5


def test_rules_read_from_vae_configs_match_the_diffusers_pipelines():
    sd = LatentNorm.from_vae_config({"scaling_factor": 0.18215})
    assert (sd.scale, sd.shift, sd.per_channel, sd.scalar_scale) == (LATENT_SCALE, 0.0, False, LATENT_SCALE)
    assert LatentNorm.from_vae_config({}).scale == LATENT_SCALE  # diffusers' default scaling_factor
    flux = LatentNorm.from_vae_config(FLUX1)
    assert (flux.scale, flux.shift, flux.scalar_scale) == (0.3611, 0.1159, None)
    z = _z()
    # diffusers' FLUX / SD3 pipelines: encode (z - shift_factor) * scaling_factor, decode x / scaling_factor + shift
    torch.testing.assert_close(flux.normalize(z), (z - 0.1159) * 0.3611, rtol=0, atol=0)
    torch.testing.assert_close(flux.denormalize(z), z / 0.3611 + 0.1159, rtol=0, atol=0)
    # per-channel (SDXL-style pipelines: (z - mean) * scaling_factor / std, decode x * std / scaling_factor + mean)
    pg = LatentNorm.from_vae_config(PLAYGROUND)
    assert pg.per_channel and pg.channels == 4
    mean, std = (
        torch.tensor(PLAYGROUND["latents_mean"]).view(4, 1, 1),
        torch.tensor(PLAYGROUND["latents_std"]).view(4, 1, 1),
    )
    z4 = _z(4)
    torch.testing.assert_close(pg.normalize(z4), (z4 - mean) * 0.5 / std)
    torch.testing.assert_close(pg.denormalize(z4), z4 * std / 0.5 + mean)
    with pytest.raises(ValueError, match="4 channels, the latents have 16"):
        pg.normalize(_z(16))
    stats = LatentNorm.from_statistics([0.5, -1.0], [2.0, 4.0])
    assert stats.scale == (0.5, 0.25) and stats.shift == (0.5, -1.0) and stats.source == "dataset"
    assert LatentNorm.from_json(json.loads(json.dumps(pg.to_json()))) == pg  # the manifest's JSON round trip
    for bad in ({"scale": 0.0}, {"scale": float("nan")}, {"scale": (1.0, 2.0), "shift": (0.0,)}):
        with pytest.raises(ValueError):
            LatentNorm(**bad)


@pytest.mark.parametrize("norm", [LatentNorm(), LatentNorm.from_vae_config(FLUX1), LatentNorm.from_vae_config(SD3),
                                  LatentNorm.from_statistics([0.1 * i - 0.7 for i in range(16)],
                                                             [0.2 + 0.3 * i for i in range(16)])],
                         ids=["sd", "flux", "sd3", "dataset"])  # fmt: skip
def test_normalise_then_denormalise_is_the_identity(norm):
    z = _z()
    torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.normalize(norm.denormalize(z)), z, rtol=1e-6, atol=1e-6)


def test_a_vae_module_without_a_config_uses_the_sd_vae_scale():
    """A bare module with `encode`/`decode` and no diffusers `config`: 0.18215 and no shift unless `scale` is given."""
    bare = torch.nn.Identity()
    assert not hasattr(bare, "config")
    assert VAE(bare).norm == LatentNorm() and VAE(bare).scale == LATENT_SCALE
    assert VAE(bare, scale=0.5).scale == 0.5


def test_sd_vae_default_stays_bit_identical():
    """SD-VAE (scaling_factor 0.18215, no shift): x = z * 0.18215 and decode(x) = vae.decode(x / 0.18215), bit for
    bit the expressions used before normalisations were configurable."""
    vae = VAE.from_config()
    assert vae.norm == LatentNorm(scale=LATENT_SCALE, source="vae") and vae.scale == LATENT_SCALE
    mean, std = vae.encode_moments(torch.rand(2, 3, 16, 16) * 2 - 1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(vae.sample_latents(mean, std, torch.Generator().manual_seed(1)), (mean + std * eps) * 0.18215)
    assert torch.equal(
        sample_latents(mean, std, torch.Generator().manual_seed(1), vae.norm), (mean + std * eps) * 0.18215
    )
    x = (mean + std * eps) * 0.18215
    assert torch.equal(vae.decode(x), vae.vae.decode(x / 0.18215).sample.float())
    assert torch.equal(decoder_for("random:tiny")(x), load_vae("random:tiny").decode_to_uint8(x))
    cfg = run_config(load_vae("random:small"), [], 32, False, "float32", "float16")
    assert cfg["latent_scale"] == LATENT_SCALE and "latent_norm" not in cfg  # the plan of earlier versions
    # manifests of earlier versions (no latent_norm) mean x = z * latent_scale
    assert manifest_latent_norm({"config": {"latent_scale": 0.18215}}) == LatentNorm(source="manifest")


def test_sd3_and_flux_presets_have_the_real_layout():
    """`random:flux` / `random:sd3` are FLUX.1's / SD3's AutoencoderKL (built on the meta device here: 84M
    parameters); `random:flux-small` is the same layout at a small width (the end-to-end test below)."""
    from diffusers import AutoencoderKL

    for name, real in (("flux", FLUX1), ("sd3", SD3)):
        preset = RANDOM_VAE_PRESETS[name]
        assert {k: preset[k] for k in real} == real
        with torch.device("meta"):
            model = AutoencoderKL(**preset)
        assert model.quant_conv is None and model.post_quant_conv is None and model.config.latent_channels == 16
        assert 83e6 < sum(p.numel() for p in model.parameters()) < 85e6
        assert LatentNorm.from_vae_config(model.config) == LatentNorm.from_vae_config(real)
    small = load_vae("random:flux-small")
    assert (small.latent_channels, small.downsample, small.vae.quant_conv) == (16, 8, None)
    assert small.norm == LatentNorm(scale=0.3611, shift=0.1159, source="vae")
    with pytest.raises(ValueError, match="VAE.normalize"):
        small.scale  # noqa: B018 - a scalar scale would silently drop the shift


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (36, 40 + 4 * i, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _prepare(src: Path, out: Path, norm: str, rc: int = 0) -> LatentShards | None:
    argv = ["prepare", str(src), str(out), "--resolution", "32", "--vae", "random:flux-small", "--encoders", "none",
            "--latent-norm", norm, "--flip", "--shard-size", "4", "--batch-size", "3", "--workers", "0",
            "--no-progress"]  # fmt: skip
    assert cli_main(argv) == rc
    return LatentShards(out) if rc == 0 else None


def test_prepare_dataset_or_vae_norm_then_train_one_step_and_decode_with_the_inverse(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    src = _images(tmp_path / "images")
    vae = load_vae("random:flux-small")
    idx, flips = torch.arange(6), torch.tensor([False, True] * 3)

    # --latent-norm vae: FLUX.1's scale and shift from the VAE config
    by_vae = _prepare(src, tmp_path / "vae", "vae")
    assert by_vae.manifest["config"]["latent_scale"] is None and by_vae.scale is None
    assert by_vae.latent_norm == vae.norm == read_latent_norm(tmp_path / "vae")
    mean, std = by_vae.moments(idx, flips)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(by_vae.batch(idx, flips, "cpu", eps=eps)["x"], (mean + std * eps - 0.1159) * 0.3611)

    # --latent-norm dataset: per-channel statistics of the training latents z = mean + std * eps, in the manifest
    data = _prepare(src, tmp_path / "dataset", "dataset")
    norm, entry = data.latent_norm, data.manifest["latent_norm"]
    assert (
        norm.source == "dataset"
        and norm.channels == 16
        and data.manifest["config"]["latent_norm"] == {"source": "dataset"}
    )
    mean, std = data.moments(torch.arange(6).repeat(2), torch.tensor([False] * 6 + [True] * 6))
    m64, s64 = mean.double(), std.double()
    mu = m64.mean((0, 2, 3))
    sigma = (m64.pow(2).mean((0, 2, 3)) - mu**2 + s64.pow(2).mean((0, 2, 3))).sqrt()
    torch.testing.assert_close(torch.tensor(entry["mean"], dtype=torch.float64), mu)
    torch.testing.assert_close(torch.tensor(entry["std"], dtype=torch.float64), sigma)
    assert entry["num_values"] == 12 * 4 * 4
    # so the training latents have zero mean and unit variance per channel (exactly, over their distribution)
    x_mean = (m64 - mu.view(16, 1, 1)) / sigma.view(16, 1, 1)
    x_var = (x_mean.pow(2) + (s64 / sigma.view(16, 1, 1)).pow(2)).mean((0, 2, 3)) - x_mean.mean((0, 2, 3)) ** 2
    torch.testing.assert_close(x_mean.mean((0, 2, 3)), torch.zeros(16, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(x_var, torch.ones(16, dtype=torch.float64), atol=1e-6, rtol=0)
    mean, std = data.moments(idx, flips)
    x = data.batch(idx, flips, "cpu", eps=eps)["x"]
    torch.testing.assert_close(x, (mean + std * eps - mu.float().view(16, 1, 1)) / sigma.float().view(16, 1, 1))
    torch.testing.assert_close(norm.denormalize(x), mean + std * eps, rtol=1e-6, atol=1e-6)  # the round trip
    _prepare(src, tmp_path / "dataset", "vae", rc=2)  # the same folder with another normalisation: refused
    assert "other settings (config.latent_norm" in capsys.readouterr().err

    # one training step on these latents, then samples decoded through the inverse of the manifest's normalisation
    run = tmp_path / "run"
    over = [f"data.root={tmp_path / 'dataset'}", "data.vae=random:flux-small", "data.resolution=32",
            f"train.run_dir={run}", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.align_depth=1",
            "model.projector_dim=32", "train.global_batch_size=2", "train.max_steps=1", "train.sample_every=1000",
            "train.mixed_precision=no", "train.progress=false", "sample.num_steps=2"]  # fmt: skip
    from repa.loading import load_model
    from repa.training import train

    assert train(load_config(ROOT / "configs" / "sit-b2.yaml", over))["step"] == 1
    loaded = load_model(run, device="cpu")
    assert loaded.sample_shape == (16, 4, 4) and run_latent_norm(loaded.cfg) == norm
    x = generate(loaded.model, loaded.cfg, torch.tensor([0, 1]), loaded.sample_shape, seed=0)
    images = decoder_for(loaded.vae(), "cpu", run_latent_norm(loaded.cfg))(x)
    want = ((vae.vae.decode(norm.denormalize(x)).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert images.shape == (2, 3, 32, 32) and torch.equal(images, want)
    assert torch.equal(decoder_for("random:flux-small", "cpu", tmp_path / "dataset")(x), images)  # a shards folder
    assert torch.equal(decoder_for("random:flux-small", "cpu", entry)(x), images)  # a manifest entry
    assert not torch.equal(decoder_for("random:flux-small")(x), images)  # the VAE's own (FLUX) normalisation differs
    with pytest.raises(ValueError, match="16 channels, the latents have 4"):
        decoder_for("random:tiny", "cpu", norm)


def test_unusable_normalisations_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_latent_norm(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"config": {"latent_scale": None}}))
    with pytest.raises(ShardError, match="neither a latent_norm nor a latent_scale"):
        read_latent_norm(tmp_path)
    with pytest.raises(ValueError, match="latent_norm must be one of"):
        run_config(load_vae("random:tiny"), [], 16, False, "float32", "float16", latent_norm="batch")
