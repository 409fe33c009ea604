"""What one checkpoint is scored against, and the scores: FID of EMA samples, linear-probe accuracy and CKNNA of
pooled hidden states (per alignment block), all through library code."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.convergence.presets import CKNNA_K, FID_METHOD, PROBE_T, Preset, device_of
from repa.analysis import alignment, collect_hidden_states, linear_probe
from repa.analysis.run import encoder_features
from repa.config import Config
from repa.data.sources import fashion_mnist_images
from repa.data.vae import from_uint8
from repa.data.vae_spec import load_vae
from repa.evaluation import InceptionDetector, balanced_labels, compute_activations, frechet_distance
from repa.evaluation.reference import ReferenceStats, reference_stats
from repa.fileio import atomic_file
from repa.generate import apply_sample_overrides, decoder_for, generate_batches, run_latent_norm
from repa.loading import load_model

FID_SEED = 1000  # the sampling seed of every FID evaluation: the same noise for every arm and checkpoint
PROBE_SEED = 7  # the noise of the probe / CKNNA inputs


def make_detector(device: torch.device):
    """The FID feature network (tests substitute a small stand-in)."""
    return InceptionDetector(classifier=None, device=device)


def fid_reference(detector, num: int, root: str | None) -> ReferenceStats:
    """Inception statistics of the first `num // 10` test images of each class (Fashion-MNIST under `root`), cached
    by (file content, detector) in the repa cache: the reference `repa eval ... fashion-mnist:test` uses too."""
    return reference_stats("fashion-mnist:test", detector, limit=num, data_root=root)


def cknna_targets(cfg: Config, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean-pooled patch tokens (N, D) of the config's first REPA encoder: the CKNNA target."""
    r = cfg.repa
    weights = r.encoder_weights[0] if r.encoder_weights else None
    return encoder_features(r.encoders[0], images, r.encoder_resolution, r.encoder_layer, weights, batch_size=250,
                            device=device, progress=False)  # fmt: skip


def prepare_shared(out: Path, cfg: Config, preset: Preset, data_root: str | None, fid: bool = True) -> None:
    """Once per output folder: FID reference statistics (unless `fid` is False: FID deferred, no Inception here),
    probe images, CKNNA targets -> `<out>/shared.pt`."""
    path = out / "shared.pt"
    if path.is_file():
        return
    device = device_of(preset)
    shared: dict[str, torch.Tensor] = {}
    if fid:
        mu, sigma = fid_reference(make_detector(device), preset.fid_reference, data_root).stats["pool"]
        shared.update(fid_mu=torch.from_numpy(mu), fid_sigma=torch.from_numpy(sigma))
    train_images, train_labels = fashion_mnist_images("train", preset.probe_train, data_root)
    test_images, test_labels = fashion_mnist_images("test", preset.probe_test, data_root)
    print(f"[convergence] CKNNA targets: encoder features of {len(test_images)} test images", flush=True)
    shared.update({
        "probe_train_images": train_images, "probe_train_labels": train_labels,
        "probe_test_images": test_images, "probe_test_labels": test_labels,
        "align_targets": cknna_targets(cfg, test_images, device),
    })  # fmt: skip
    with atomic_file(path) as f:
        torch.save(shared, f)


def sample_fid(detector, batches: Iterable[torch.Tensor], num: int, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of uint8 sample batches (B, C, H, W) against reference statistics (mu, sigma). The deferred scoring
    (`benchmarks.convergence.deferred`) feeds saved samples through this with the same batches, so its value equals
    the one scoring during the run."""
    acts = compute_activations(detector, batches, num, progress=False)
    return float(frechet_distance(acts.stats["pool"].mean, acts.stats["pool"].cov, mu, sigma, method=FID_METHOD))


def save_fid_samples(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write the FID samples of one checkpoint (uint8 (N, C, H, W) and labels) atomically, for deferred scoring."""
    with atomic_file(path) as f:
        np.savez(f, images=images.numpy(), labels=labels.numpy())


def model_inputs(loaded: Any, images: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Clean inputs of uint8 images in the model's space: pixels / 127.5 - 1, or for latent arms the normalised
    posterior mean of the run's VAE (REPA-E: the checkpoint's tuned VAE with its BatchNorm's statistics)."""
    x = from_uint8(images)
    spec = loaded.vae()
    if spec is None:
        return x
    vae = load_vae(spec, device)
    c = int(vae.vae.config.in_channels)
    return torch.cat([vae.normalize(vae.encode_moments(b.expand(-1, c, -1, -1).to(device))[0]).cpu()
                      for b in x.split(batch)])  # fmt: skip


def evaluate_checkpoint(
    ckpt: Path, p: Preset, layers: tuple[int, ...], shared: dict[str, Any], detector,
    samples_out: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """FID, probe accuracy and CKNNA (per block in `layers`) of one checkpoint's EMA model (the probe trains, so no
    global no_grad here; sampling and feature extraction run without gradients on their own).

    With `detector=None` the FID is deferred: the uint8 samples are written to `samples_out` (`save_fid_samples`)
    and the row's `fid` is None, to be filled by `--score-samples` on a machine with the Inception network."""
    device = device_of(p)
    t0, c0 = time.perf_counter(), time.process_time()
    loaded = load_model(ckpt, prefer_ema=True, device=device)
    model, cfg = loaded.model, loaded.cfg
    apply_sample_overrides(cfg, {"sampler": "ode", "heun": True, "num_steps": p.sample_steps, "cfg_scale": 1.0})
    labels = balanced_labels(p.fid_samples, loaded.num_classes, seed=0)
    # pixel arms decode directly; latent arms through the run's VAE (REPA-E: the checkpoint's tuned VAE)
    decode = decoder_for(loaded.vae(), device, run_latent_norm(cfg))
    samples = generate_batches(model, cfg, labels, loaded.sample_shape, seed=FID_SEED, batch_size=p.eval_batch,
                               decode=decode)  # fmt: skip
    row: dict[str, Any] = {"fid": None}
    if detector is not None:
        row["fid"] = sample_fid(detector, samples, len(labels), shared["fid_mu"].numpy(), shared["fid_sigma"].numpy())
    else:
        if samples_out is None:
            raise ValueError("a deferred FID (detector=None) needs samples_out")
        save_fid_samples(samples_out, torch.cat([b.cpu() for b in samples]), labels.cpu())
    feats = {}
    for split in ("train", "test"):
        x = model_inputs(loaded, shared[f"probe_{split}_images"], p.eval_batch, device)
        feats[split] = collect_hidden_states(model, x.split(p.eval_batch), layers, [PROBE_T], seed=PROBE_SEED)
    for layer in layers:
        tr, te = feats["train"][(layer, PROBE_T)], feats["test"][(layer, PROBE_T)]
        res = linear_probe(tr, shared["probe_train_labels"], te, shared["probe_test_labels"], num_classes=10,
                           epochs=p.probe_epochs, lr=p.probe_lr, seed=0, device=device)  # fmt: skip
        row[f"probe_acc_l{layer}"] = res.test_acc
        row[f"cknna_l{layer}"] = alignment(te, shared["align_targets"], "cknna", k=CKNNA_K)
    row.update(eval_s=time.perf_counter() - t0, eval_cpu_s=time.process_time() - c0)
    return row
