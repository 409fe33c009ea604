"""`train_autoencoder`: a small diffusers AutoencoderKL trained on a run's training images (`repa train-vae`), so
latent-space presets (and REPA-E, which tunes a VAE it is given) have a real VAE where no pretrained one fits.

The loss is the VAE's own: L1 reconstruction of a posterior sample plus `kl_coeff` x KL(posterior || N(0, I))
(summed per image, batch mean, as diffusers' `DiagonalGaussianDistribution.kl` gives it); no perceptual or
adversarial term. The written folder is a `save_pretrained` folder whose config carries the per-channel mean and
std of the training latents as `latents_mean` / `latents_std` (scaling_factor 1), so `data.vae=OUT` feeds the
diffusion model unit-variance latents (`LatentNorm.from_vae_config`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from repa.config import Config
from repa.data.sources import fashion_mnist_images
from repa.data.tuned_vae import save_with_latent_statistics
from repa.data.vae import from_uint8, to_uint8
from repa.data.vae_spec import load_vae
from repa.generate import save_grid
from repa.training.data import InMemoryImages, load_train_images


@dataclass(frozen=True)
class AutoencoderSettings:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    kl_coeff: float = 1e-6
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    eval_images: int = 1000  # held-out images (the test split of Fashion-MNIST) for the reported reconstruction

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1 or self.eval_images < 0:
            raise ValueError(f"steps, batch_size and log_every must be >= 1 and eval_images >= 0: {self}")
        if not (0 < self.lr < 1 and self.kl_coeff >= 0 and self.grad_clip >= 0):
            raise ValueError(f"need 0 < lr < 1, kl_coeff >= 0, grad_clip >= 0: {self}")


def _pixels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float [-1, 1] with the VAE's channel count (grayscale repeated)."""
    x = from_uint8(images)
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 and channels != 1 else x


def _held_out(cfg: Config, num: int) -> torch.Tensor | None:
    """The first `num` class-balanced test images of Fashion-MNIST (None for other data, or num = 0)."""
    if cfg.data.kind != "fashion-mnist" or num == 0:
        return None
    return fashion_mnist_images("test", num, cfg.data.root)[0]


@torch.no_grad()
def _reconstruction(ae: torch.nn.Module, images: torch.Tensor, channels: int, batch: int = 250) -> dict[str, float]:
    """L1 and PSNR (images in [-1, 1], peak-to-peak 2) of decode(posterior mean) on `images`."""
    l1, mse = 0.0, 0.0
    for i in range(0, len(images), batch):
        x = _pixels(images[i : i + batch], channels)
        r = ae.decode(ae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        l1 += float(F.l1_loss(r, x, reduction="sum"))
        mse += float(F.mse_loss(r, x, reduction="sum"))
    n = images.numel() * channels
    return {"l1": l1 / n, "psnr": 10 * math.log10(4.0 / (mse / n))}


@torch.no_grad()
def _latent_statistics(ae: torch.nn.Module, images: torch.Tensor, channels: int, seed: int, batch: int = 250):
    """Per-channel mean and std of posterior samples z = mean + std * eps over `images` (float64 sums)."""
    g = torch.Generator().manual_seed(seed)
    s1 = s2 = None
    count = 0
    for i in range(0, len(images), batch):
        d = ae.encode(_pixels(images[i : i + batch], channels)).latent_dist
        z = (d.mean + d.std * torch.randn(d.mean.shape, generator=g)).double()
        s1 = z.sum((0, 2, 3)) if s1 is None else s1 + z.sum((0, 2, 3))
        s2 = (z * z).sum((0, 2, 3)) if s2 is None else s2 + (z * z).sum((0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    mean = s1 / count
    std = (s2 / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def train_autoencoder(cfg: Config, out: str | Path, settings: AutoencoderSettings = AutoencoderSettings(),
                      progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train `cfg.data.vae` (a `random:<preset>` spec starts from scratch; a pretrained one is fine-tuned) on the
    training images of `cfg.data` and write it as a diffusers folder `out` (atomically: a temporary folder renamed).

    Returns:
        the summary written to `out/train_vae.json`: settings, losses per logged step, held-out L1/PSNR, the latent
        statistics, wall time.

    Raises:
        FileExistsError: `out` exists (nothing is overwritten).
        ValueError: latent shards (`data.kind=latents`) hold latents, not images.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose another folder or delete it (nothing was trained)")
    data = load_train_images(cfg)
    if not isinstance(data, InMemoryImages):
        raise ValueError("repa train-vae trains on images: use data.kind=fashion-mnist or folder, not latent shards")
    s = settings
    torch.manual_seed(s.seed)
    vae = load_vae(cfg.data.vae)
    ae, channels, f = vae.vae, vae.in_channels, vae.downsample  # the AutoencoderKL inside the frozen wrapper
    ae.requires_grad_(True).train()
    if data.images.shape[-1] % f or data.images.shape[-2] % f:
        raise ValueError(f"the VAE {cfg.data.vae} downsamples by {f}: {tuple(data.images.shape[-2:])} images do not "
                         "divide")  # fmt: skip
    opt = torch.optim.AdamW(ae.parameters(), lr=s.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(s.seed)
    start, log, window = time.perf_counter(), [], {"recon": 0.0, "kl": 0.0}
    for step in tqdm(range(s.steps), desc="train-vae", disable=not progress, dynamic_ncols=True):
        idx = torch.randint(len(data.images), (s.batch_size,), generator=g)
        images = data.images[idx]
        if cfg.data.hflip:
            flip = torch.rand(s.batch_size, generator=g) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        x = _pixels(images, channels)
        d = ae.encode(x).latent_dist
        z = d.mean + d.std * torch.randn(d.mean.shape, generator=g)
        recon, kl = F.l1_loss(ae.decode(z).sample, x), d.kl().mean()
        loss = recon + s.kl_coeff * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(ae.parameters(), s.grad_clip)
        opt.step()
        window["recon"] += float(recon.detach())
        window["kl"] += float(kl.detach())
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:  # the means since the previous line
            n = (step % s.log_every) + 1
            log.append({"step": step + 1, **{k: v / n for k, v in window.items()}})
            window = {"recon": 0.0, "kl": 0.0}
    ae.eval()
    mean, std = _latent_statistics(ae, data.images, channels, s.seed)
    held_out = _held_out(cfg, s.eval_images)
    summary = {
        "vae_start": cfg.data.vae, "data": f"{data.name} ({len(data.images)} images)", "settings": asdict(s),
        "log": log, "latents_mean": mean, "latents_std": std, "train_seconds": round(time.perf_counter() - start, 1),
        "train_reconstruction": _reconstruction(ae, data.images[: s.eval_images or 1000], channels),
        "test_reconstruction": None if held_out is None else _reconstruction(ae, held_out, channels),
    }  # fmt: skip
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_with_latent_statistics(ae, tmp, mean, std)
    (tmp / "train_vae.json").write_text(json.dumps(summary, indent=1))
    shown = (held_out if held_out is not None else data.images)[:10]
    with torch.no_grad():
        r = ae.decode(ae.encode(_pixels(shown, channels)).latent_dist.mean).sample.clamp(-1, 1)
    pairs = torch.cat([_pixels(shown, channels), r])  # originals, then reconstructions
    save_grid(to_uint8(pairs), tmp / "reconstructions.png", nrow=len(shown))
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return summary
