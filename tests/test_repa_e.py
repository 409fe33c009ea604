"""REPA-E (`train.end_to_end`): the VAE trains through the alignment loss only, its latent BatchNorm's statistics
travel with the checkpoints, resume is exact, `repa sample` and `repa export-vae` use the tuned VAE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from repa.checkpoint import latest_checkpoint, load_checkpoint
from repa.cli.main import main as cli_main
from repa.config import ConfigError, load_config
from repa.data.tuned_vae import TunedVAE
from repa.data.vae import VAE
from repa.data.vae_spec import load_vae
from repa.generate import generate_batches, grid_labels
from repa.loading import load_model
from repa.losses import RepaLoss
from repa.models import build_model
from repa.training import train
from repa.training.end_to_end import EndToEnd
from tests.helpers.tiny import PatchEncoder, tiny_overrides
from tests.test_faults import assert_same_training_state

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# a tiny SiT on the 14x14x4 latents of the random-init `random:tiny` AutoencoderKL (SD-VAE block layout, 2 levels)
E2E = ("data.space=latent", "data.vae=random:tiny", "train.end_to_end=true", "model.name=SiT-T/2",
       "train.sample_every=4", "train.checkpoint_every=2", "train.max_steps=4")  # fmt: skip

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _config(run: Path, fmnist_root: Path, *extra: str):
    return load_config(TINY, tiny_overrides(run, fmnist_root, *E2E, *extra))


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory, fmnist_root):
    """4 end-to-end steps (checkpoints at 2 and 4, a sample grid at 4)."""
    tmp = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("REPA_CACHE", str(tmp / "cache"))
        m.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
        train(_config(tmp / "run", fmnist_root))
    return tmp / "run"


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _grads(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def test_alignment_reaches_the_vae_encoder_and_denoising_does_not(tmp_path, fmnist_root):
    """The VAE pass backpropagates its terms into the VAE only; the model pass (denoise + align on bn(z.detach()))
    adds nothing to the VAE's gradient; each term's gradient checked on its own."""
    cfg = _config(tmp_path / "run", fmnist_root, "train.vae_recon_coeff=0", "train.vae_kl_coeff=0")
    e2e = EndToEnd(cfg, "cpu")
    torch.manual_seed(0)
    model = build_model("SiT-T/2", input_size=14, in_channels=4, num_classes=10, hidden_size=32, depth=2,
                        num_heads=2, align_depth=1, encoder_dims=[16], projector_dim=32)  # fmt: skip
    loss_fn = RepaLoss(align_coeff=0.5)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=g)
    batch = {"pixels": (images.float() / 127.5 - 1).expand(-1, 3, -1, -1), "y": torch.arange(4)}
    targets = [PatchEncoder(98)(images)]
    t, noise = torch.rand(4, generator=g), torch.randn(4, 4, 14, 14, generator=g)
    eps = torch.randn(4, 4, 14, 14, generator=g)
    encoder = list(e2e.tuned.vae.encoder.parameters())

    x, terms = e2e.vae_pass(model, loss_fn, batch, targets, t, noise, eps, {},
                            backward=lambda loss: loss.backward(inputs=e2e.params))  # fmt: skip
    assert terms["vae/align"] < 0 and torch.equal(terms["vae/total"], 1.5 * terms["vae/align"])
    assert all(p.grad is None for p in model.parameters())  # the VAE pass leaves the model alone
    after_vae = _grads(encoder)
    assert sum(float(gr.abs().sum()) for gr in after_vae if gr is not None) > 0  # alignment -> encoder
    assert not x.requires_grad and x.grad_fn is None

    model_terms = loss_fn(model, x, batch["y"], targets, t=t, noise=noise)
    model_terms["denoise"].backward(retain_graph=True)  # the denoising term alone
    assert all(torch.equal(a, p.grad) for a, p in zip(after_vae, encoder))
    assert any(p.grad is not None for p in model.parameters())
    (0.5 * model_terms["align"]).backward()  # the model's own alignment term sees the detached latents too
    assert all(torch.equal(a, p.grad) for a, p in zip(after_vae, encoder))

    # and the same latents without the stop-gradient: the denoising term would reach the encoder
    for p in e2e.params:
        p.grad = None
    dist = e2e.tuned.vae.encode(batch["pixels"]).latent_dist
    z = dist.mean + dist.std * eps
    loss_fn(model, e2e.tuned.bn.normalize_running(z), batch["y"], None, t=t, noise=noise)["denoise"].backward()
    assert sum(float(p.grad.abs().sum()) for p in encoder if p.grad is not None) > 0


def test_checkpoints_hold_the_tuned_vae_and_bn_statistics_bit_exactly(e2e_run, tmp_path):
    ckpt = latest_checkpoint(e2e_run / "checkpoints")
    state = load_checkpoint(ckpt)
    vae = state["vae"]
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= vae.keys()
    assert int(vae["bn.num_batches_tracked"]) == 4  # one update per step (one micro-batch)
    assert not torch.equal(vae["bn.running_var"], torch.ones(4))  # the statistics moved
    start = load_vae("random:tiny").vae.state_dict()
    assert any(not torch.equal(start[k], vae[f"vae.{k}"]) for k in start)  # the VAE trained
    tuned = TunedVAE.load(ckpt / "vae.safetensors")
    for k, v in tuned.state_dict().items():
        assert torch.equal(v, vae[k]), k
    assert tuned.bn.eps == 1e-4 and tuned.bn.momentum == 0.1
    tuned.save(tmp_path / "again.safetensors")  # save/load round trip: the same tensors and metadata
    again = load_file(str(tmp_path / "again.safetensors"))
    assert again.keys() == vae.keys() and all(torch.equal(again[k], vae[k]) for k in vae)
    assert _metadata(tmp_path / "again.safetensors") == _metadata(ckpt / "vae.safetensors")
    # the optimizer has the VAE's param group with its own lr
    groups = state["optimizer"]["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == 1e-4 and groups[0]["lr"] == 3e-4
    metrics = [line for line in (e2e_run / "metrics.jsonl").read_text().splitlines()]
    assert all('"vae/align"' in line and '"vae_grad_norm"' in line for line in metrics)
    assert (e2e_run / "samples" / "step_00000004.png").is_file()


def test_resume_is_bit_identical(e2e_run, tmp_path, fmnist_root, test_encoder):
    part = tmp_path / "part"
    train(_config(part, fmnist_root, "train.max_steps=2"))
    train(_config(part, fmnist_root))  # the same command resumes from step 2
    full = tmp_path / "full"
    shutil.copytree(e2e_run, full)
    assert_same_training_state(full, part)
    ca, cb = (latest_checkpoint(r / "checkpoints") for r in (full, part))
    va, vb = (load_file(str(c / "vae.safetensors")) for c in (ca, cb))
    assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)


def test_after_a_schedule_stop_the_vae_keeps_its_alignment_term(tmp_path, fmnist_root, test_encoder):
    """A schedule weighs the model's alignment term only: past the stop it logs 0, the VAE's term goes on."""
    run = tmp_path / "run"
    train(_config(run, fmnist_root, "repa.schedule=stop", "repa.schedule_stop=2"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["align_weight"] for r in records] == [1.0, 1.0, 0.0, 0.0]
    assert all(r["align"] != 0.0 for r in records[:2]) and all(r["align"] == 0.0 for r in records[2:])
    assert all(r["vae/align"] != 0.0 for r in records)


def test_repa_sample_decodes_with_the_tuned_vae_and_its_bn_statistics(e2e_run, tmp_path):
    out = tmp_path / "samples"
    assert cli_main(["sample", str(e2e_run), "--num", "4", "--steps", "2", "--out", str(out)]) == 0
    written = np.load(next(out.glob("*.npz")))["arr_0"]
    assert written.shape == (4, 28, 28, 3)
    loaded = load_model(e2e_run)
    tuned = TunedVAE.load(loaded.path / "vae.safetensors")
    bn = tuned.bn

    def decode(x):  # decode(x * sqrt(running_var + eps) + running_mean) with the tuned weights
        z = x * torch.sqrt(bn.running_var + bn.eps).view(-1, 1, 1) + bn.running_mean.view(-1, 1, 1)
        return ((tuned.vae.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    labels = grid_labels(4, 10)
    with torch.no_grad():
        want = torch.cat(list(generate_batches(loaded.model, loaded.cfg, labels, loaded.sample_shape, seed=0,
                                               batch_size=64, decode=decode)))  # fmt: skip
    diff = (torch.from_numpy(written).permute(0, 3, 1, 2).int() - want.int()).abs()
    assert int(diff.max()) <= 1  # (x / (1 / std) vs x * std: one rounding step at most)
    start = load_vae("random:tiny")  # the VAE the run started from gives other images
    with torch.no_grad():
        x = torch.randn(2, 4, 14, 14)
        assert not torch.equal(start.decode_to_uint8(x), decode(x))


def test_export_vae_round_trip(e2e_run, tmp_path):
    out = tmp_path / "vae"
    assert cli_main(["export-vae", str(e2e_run), str(out)]) == 0
    assert (out / "config.json").is_file()
    exported = load_vae(str(out))
    tuned = TunedVAE.load(latest_checkpoint(e2e_run / "checkpoints") / "vae.safetensors")
    images = torch.rand(3, 3, 28, 28) * 2 - 1
    mean, std = exported.encode_moments(images)
    with torch.no_grad():
        dist = tuned.vae.encode(images).latent_dist
    assert torch.equal(mean, dist.mean) and torch.equal(std, dist.std)  # the same latents
    torch.testing.assert_close(exported.normalize(mean), tuned.bn.normalize_running(dist.mean), rtol=1e-5, atol=1e-5)
    assert exported.norm.per_channel and exported.norm.source == "vae"
    assert cli_main(["export-vae", str(tmp_path), str(tmp_path / "x")]) == 2  # not a run: one line, usage exit


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.space=pixel"], r"train.end_to_end=true \(REPA-E\) trains the VAE .*set data.space=latent"),
        (["repa.encoders=[]"], r"train.end_to_end=true \(REPA-E\) tunes the VAE through the alignment loss"),
        (["repa.align_coeff=0"], r"needs a target encoder"),
        (["train.vae_lr=-1"], r"train.vae_lr must be >= 0"),
        (["train.latent_bn_momentum=0"], r"train.latent_bn_momentum must be in \(0, 1\]"),
        (["train.mixed_precision=fp16"], r"fp16"),
    ],
)
def test_end_to_end_config_errors_are_one_line(overrides, message, tmp_path, fmnist_root):
    with pytest.raises(ConfigError, match=message) as info:
        _config(tmp_path, fmnist_root, *overrides)
    assert "\n" not in str(info.value)


def test_latent_space_without_end_to_end_trains_on_the_frozen_vaes_latents(tmp_path, fmnist_root, test_encoder):
    """REPA-E's baseline: the same images in the latent space of the frozen starting VAE, encoded once (posterior
    moments, mirror images too), a fresh posterior sample each step; the run resumes exactly and `repa sample`
    decodes with that VAE."""
    from repa.training.data import PrecomputedLatents, load_train_images

    cfg = _config(tmp_path / "run", fmnist_root, "train.end_to_end=false", "data.hflip=true")
    data = load_train_images(cfg)
    assert isinstance(data, PrecomputedLatents) and data.sample_shape == (4, 14, 14) and data.mean.shape[:2] == (2, 40)
    vae = load_vae("random:tiny")
    mean, std = vae.encode_moments(data.images[:3].float().expand(-1, 3, -1, -1) / 127.5 - 1)
    torch.testing.assert_close(data.mean[0, :3], mean, rtol=1e-5, atol=1e-6)  # conv rounding depends on the batch
    torch.testing.assert_close(data.std[0, :3], std, rtol=1e-5, atol=1e-6)
    eps = torch.randn(3, 4, 14, 14)
    batch = data.batch(torch.arange(3), torch.tensor([False, True, False]), "cpu", eps=eps)
    assert torch.equal(batch["x"][0], vae.normalize(data.mean[0, 0] + data.std[0, 0] * eps[0]))
    assert torch.equal(batch["x"][1], vae.normalize(data.mean[1, 1] + data.std[1, 1] * eps[1]))  # the mirror image
    assert batch["images"].shape == (3, 1, 28, 28)  # the encoders' input stays the image
    train(cfg)
    part = tmp_path / "part"
    train(_config(part, fmnist_root, "train.end_to_end=false", "data.hflip=true", "train.max_steps=2"))
    train(_config(part, fmnist_root, "train.end_to_end=false", "data.hflip=true"))
    assert_same_training_state(part, tmp_path / "run")
    assert not (latest_checkpoint(tmp_path / "run/checkpoints") / "vae.safetensors").exists()
    out = tmp_path / "samples"
    assert cli_main(["sample", str(tmp_path / "run"), "--num", "4", "--steps", "2", "--out", str(out)]) == 0
    assert np.load(next(out.glob("*.npz")))["arr_0"].shape == (4, 28, 28, 3)


def test_load_vae_reads_a_checkpoints_tuned_vae(e2e_run):
    """`load_vae` of a checkpoint's `vae.safetensors` is a frozen VAE with the BatchNorm's normalisation."""
    path = latest_checkpoint(e2e_run / "checkpoints") / "vae.safetensors"
    vae = load_vae(str(path))
    assert isinstance(vae, VAE) and vae.norm.source == "latent-bn"
    assert not any(p.requires_grad for p in vae.parameters())


def test_latent_bn_starts_from_the_vaes_normalisation():
    """REPA-E's init_bn: x = (z - shift) * scale  ->  running_mean = shift, running_var = 1 / scale^2."""
    from repa.data.tuned_vae import LatentBatchNorm
    from repa.data.vae import LatentNorm

    bn = LatentBatchNorm(4)
    bn.init_from(LatentNorm(scale=(0.5, 1.0, 2.0, 4.0), shift=(1.0, -1.0, 0.0, 3.0)))
    assert bn.running_mean.tolist() == [1.0, -1.0, 0.0, 3.0] and bn.running_var.tolist() == [4.0, 1.0, 0.25, 0.0625]
    z = torch.randn(2, 4, 3, 3)
    norm = LatentNorm(scale=(0.5, 1.0, 2.0, 4.0), shift=(1.0, -1.0, 0.0, 3.0))
    torch.testing.assert_close(bn.normalize_running(z), norm.normalize(z), rtol=1e-3, atol=1e-3)  # up to bn's eps
    bn.init_from(LatentNorm())  # SD-VAE's scalar 0.18215, no shift
    assert bn.running_mean.tolist() == [0.0] * 4
    torch.testing.assert_close(bn.running_var, torch.full((4,), 0.18215**-2))
    with pytest.raises(ValueError, match="3 channels, its latents 4"):
        bn.init_from(LatentNorm(scale=(1.0, 1.0, 1.0)))


def test_train_vae_writes_a_diffusers_folder_that_latent_training_uses(tmp_path, fmnist_root, monkeypatch):
    """`repa train-vae`: the loss falls, the folder loads with its measured per-channel statistics (unit-variance
    latents on the training images), REPA-E starts its BatchNorm from them, and nothing is overwritten."""
    from repa.data.vae_spec import load_vae
    from repa.training.autoencoder import _latent_statistics, _pixels

    out = tmp_path / "vae"
    args = ["train-vae", str(TINY), str(out), f"data.root={fmnist_root}", "data.num_train=null", "data.vae=random:tiny",
            "data.space=latent", "train.progress=false", "--steps", "30", "--batch-size", "8", "--lr", "3e-3",
            "--log-every", "10", "--eval-images", "0"]  # fmt: skip
    assert cli_main(args) == 0
    import json

    summary = json.loads((out / "train_vae.json").read_text())
    assert [r["step"] for r in summary["log"]] == [10, 20, 30] and summary["test_reconstruction"] is None
    assert summary["log"][-1]["recon"] < summary["log"][0]["recon"]  # it learns to reconstruct
    assert (out / "reconstructions.png").exists() and (out / "diffusion_pytorch_model.safetensors").exists()
    vae = load_vae(str(out))
    assert vae.norm.per_channel and vae.norm.shift == tuple(summary["latents_mean"])
    from repa.training.data import load_train_images

    cfg = load_config(TINY, tiny_overrides(tmp_path / "run", fmnist_root, "data.space=latent", f"data.vae={out}"))
    images = load_train_images(cfg).images
    mean, std = _latent_statistics(vae.vae, images, 3, seed=0)
    assert np.allclose(mean, summary["latents_mean"]) and np.allclose(std, summary["latents_std"])
    d = vae.vae.encode(_pixels(images, 3)).latent_dist
    x = vae.normalize(d.mean + d.std * torch.randn(d.mean.shape, generator=torch.Generator().manual_seed(0)))
    assert x.mean((0, 2, 3)).abs().max() < 1e-4 and (x.std((0, 2, 3)) - 1).abs().max() < 1e-2
    e2e = EndToEnd(load_config(TINY, tiny_overrides(tmp_path / "run", fmnist_root, *E2E, f"data.vae={out}")), "cpu")
    assert torch.allclose(
        e2e.tuned.bn.running_mean.double(), torch.tensor(summary["latents_mean"], dtype=torch.float64)
    )
    assert torch.allclose(
        e2e.tuned.bn.running_var.double().sqrt(), torch.tensor(summary["latents_std"], dtype=torch.float64)
    )
    before = (out / "train_vae.json").read_text()
    assert cli_main(args) != 0  # refused: the folder exists
    assert (out / "train_vae.json").read_text() == before


@pytest.mark.multiproc
def test_two_processes_train_like_one(tmp_path, fmnist_root):
    """DDP for the model; the VAE's gradient averaged over the ranks and the latent BatchNorm's batch statistics
    summed over them (SyncBatchNorm's semantics): 2 processes follow 1 process up to float rounding (the synced
    statistics are summed in float64 rather than by torch's batch norm), and the saved VAEs agree."""
    from tests.helpers.tiny import launch_training, metrics

    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"run{nproc}"
        launch_training(tmp_path, nproc, tiny_overrides(runs[nproc], fmnist_root, *E2E))
    m1, m2 = metrics(runs[1]), metrics(runs[2])
    assert len(m1) == len(m2) == 4
    for a, b in zip(m1, m2):
        for k in ("denoise", "align", "vae/recon", "vae/kl", "vae/align"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])
    v1, v2 = (load_file(str(latest_checkpoint(r / "checkpoints") / "vae.safetensors")) for r in (runs[1], runs[2]))
    for name in v1:
        torch.testing.assert_close(v1[name], v2[name], rtol=1e-4, atol=1e-6)


def test_end_to_end_on_latent_shards_encodes_their_stored_images(tmp_path):
    """ImageNet scale: `repa prepare --images` shards (memory-mapped) feed REPA-E their uint8 crops, encoded every
    step by the trainable VAE (the stored latents are not read; the stored targets are); shards without images are
    refused in one line."""
    from tests.test_prepare import CLI_ARGS, make_folder

    shards, bare = tmp_path / "shards", tmp_path / "bare"
    images = make_folder(tmp_path / "images")
    assert cli_main(["prepare", str(images), str(shards), *CLI_ARGS, "--images"]) == 0
    over = [
        f"train.run_dir={tmp_path / 'run'}", "data.kind=latents", f"data.root={shards}", "data.resolution=32", "data.num_train=null",
        "data.space=latent", "data.vae=random:tiny", "train.end_to_end=true", "repa.encoders=[random-dinov2-vit-s]",
        "repa.encoder_resolution=28", "repa.encoder_layer=null", "model.name=SiT-T/2", "model.hidden_size=32", "model.depth=2",
        "model.num_heads=2", "model.align_depth=1", "model.projector_dim=32", "train.global_batch_size=4",
        "train.max_steps=2", "train.log_every=1", "train.progress=false", "sample.num_images=2", "sample.num_steps=2",
        "train.mixed_precision=no",
    ]  # fmt: skip
    import repa.data.shards as shards_module

    with pytest.MonkeyPatch.context() as m:
        m.setattr(shards_module.LatentShards, "moments", lambda *a, **k: pytest.fail("the stored latents are not read"))
        m.setattr("repa.training.setup.build_encoders", lambda *a: pytest.fail("stored targets: no encoder runs"))
        train(load_config(TINY, over))
    rec = [r for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 2 and '"vae/align"' in rec[-1]
    ck = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert (ck / "vae.safetensors").exists() and (tmp_path / "run" / "samples" / "step_00000002.png").exists()
    assert cli_main(["prepare", str(images), str(bare), *CLI_ARGS]) == 0  # no --images
    over = [o.replace(str(shards), str(bare)).replace(str(tmp_path / "run"), str(tmp_path / "run2")) for o in over]
    with pytest.raises(ValueError, match="holds none: rerun `repa prepare --images`"):
        train(load_config(TINY, over))
