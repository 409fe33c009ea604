"""Generation: the one sampling loop (with the one per-batch seed rule), the one decoder from model output to uint8
images, and the PNG-grid / ADM `.npz` writers. Training grids, `repa sample`, `repa eval generate` and the
convergence benchmark all sample through here."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from repa.config import Config
from repa.config.validate import check_sampler
from repa.data.npz import save_samples
from repa.data.shards import read_latent_norm
from repa.data.vae import VAE, LatentNorm, to_uint8
from repa.data.vae_spec import load_vae
from repa.samplers import (
    dopri5_sampler,
    euler_maruyama_sampler,
    euler_sampler,
    model_joint_velocity_fn,
    model_velocity_fn,
)
from repa.seeds import generator
from repa.transport.ddpm import cfg_eps_fn, create_diffusion, ddpm_model_fn
from repa.transport.ddpm_joint import cfg_joint_eps_fn, ddpm_joint_model_fn

Decoder = Callable[[torch.Tensor], torch.Tensor]
SAMPLE_KEYS = ("sampler", "num_steps", "heun", "cfg_scale", "guidance_low", "guidance_high")


def batch_seed(seed: int, index: int) -> int:
    """The seed of the sampling batch whose first image has global index `index` (same images whatever the batch
    size splits before it, or the number of processes sharing the labels)."""
    return seed * 1_000_003 + index


@torch.no_grad()
def generate(
    model: nn.Module, cfg: Config, labels: torch.Tensor, sample_shape: tuple[int, ...], seed: int
) -> torch.Tensor:
    """Samples x (float, data space) for `labels` with the sampler in `cfg.sample` (eval mode, restored after)."""
    s = cfg.sample
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    noise = torch.randn((len(labels), *sample_shape), generator=generator(seed, 3)).to(device)
    labels = labels.to(device)
    common = dict(cfg_scale=s.cfg_scale, guidance_low=s.guidance_low, guidance_high=s.guidance_high,
                  null_label=model.num_classes)  # fmt: skip
    ddpm = cfg.transport.diffusion == "ddpm" or getattr(model, "learn_sigma", False)
    check_sampler(cfg, ddpm)  # ddim for DDPM models only, dopri5 for flow models only (overrides come after load)
    velocity_fn = model_velocity_fn(model)
    joint = bool(getattr(model, "class_token_dim", 0))  # REG: the class token is generated jointly, dropped at the end
    if joint:
        common["cls_noise"] = torch.randn((len(labels), model.class_token_dim), generator=generator(seed, 8)).to(device)
        velocity_fn = model_joint_velocity_fn(model)
    if ddpm:  # DiT: ancestral DDPM sampling (sampler ode/sde) or DDIM (ddim), over num_steps respaced steps
        eps_fn = ddpm_joint_model_fn(model) if joint else ddpm_model_fn(model)
        if s.cfg_scale > 1:
            guide = cfg_joint_eps_fn if joint else cfg_eps_fn
            eps_fn = guide(eps_fn, s.cfg_scale, model.num_classes, guidance_low=s.guidance_low,  # type: ignore[operator]
                           guidance_high=s.guidance_high)  # fmt: skip
        diffusion = create_diffusion(str(s.num_steps), learn_sigma=getattr(model, "learn_sigma", True))
        extra = {"cls_noise": common["cls_noise"]} if joint else {}
        if s.sampler == "ddim":
            x = diffusion.ddim_sample_loop(eps_fn, noise, labels, eta=s.ddim_eta, generator=generator(seed, 4), **extra)
        else:
            x = diffusion.p_sample_loop(eps_fn, noise, labels, generator=generator(seed, 4), **extra)
    elif s.sampler == "ode":
        x = euler_sampler(velocity_fn, noise, labels, num_steps=s.num_steps, heun=s.heun, **common)
    elif s.sampler == "dopri5":
        x = dopri5_sampler(velocity_fn, noise, labels, atol=s.atol, rtol=s.rtol, **common)
    else:
        x = euler_maruyama_sampler(velocity_fn, noise, labels, num_steps=s.num_steps,
                                   path=cfg.transport.path, generator=generator(seed, 4), **common)  # fmt: skip
    model.train(was_training)
    return x.float()


def generate_batches(
    model: nn.Module,
    cfg: Config,
    labels: torch.Tensor,
    sample_shape: tuple[int, ...],
    *,
    seed: int,
    batch_size: int,
    decode: Decoder,
    first_index: int = 0,
    progress: bool = False,
    desc: str = "sample",
) -> Iterator[torch.Tensor]:
    """uint8 image batches (B, C, H, W) for `labels`, `batch_size` at a time, each seeded by `batch_seed`.

    Args:
        model, cfg, sample_shape: as in `generate`.
        labels: the labels of this process, in order.
        seed: the user's sampling seed.
        batch_size: images per sampler call.
        decode: model output -> uint8 (`decoder_for`).
        first_index: global index of `labels[0]` (a rank's offset when several processes share the labels).
        progress: tqdm bar.
    """
    bar = tqdm(total=len(labels), unit="img", desc=desc, disable=not progress)
    for start in range(0, len(labels), batch_size):
        lab = labels[start : start + batch_size]
        yield decode(generate(model, cfg, lab, sample_shape, batch_seed(seed, first_index + start)))
        bar.update(len(lab))
    bar.close()


_VAES: dict[tuple[str, str], VAE] = {}
_VAE_DECODERS: dict[tuple[str, str, LatentNorm | None], Decoder] = {}
NormSpec = LatentNorm | Mapping[str, Any] | str | Path | None


def run_latent_norm(cfg: Config) -> LatentNorm | None:
    """The normalisation a latent run's data was made with: the manifest's of `data.root` for `data.kind=latents`
    when that folder is here, else None (decode with the VAE's own normalisation, which is the manifest's unless
    the shards were prepared with `--latent-norm dataset`)."""
    d = cfg.data
    if d.space != "latent" or d.kind != "latents" or not d.root:
        return None
    manifest = Path(d.root) / "manifest.json"
    return read_latent_norm(manifest) if manifest.is_file() else None


def decoder_for(vae: str | None, device: torch.device | str = "cpu", norm: NormSpec = None) -> Decoder:
    """x (data space) -> uint8 images: pixels directly (`vae` None), latents through that VAE (`repa.data.vae_spec.load_vae`
    spec: hub id, folder, or `random:...`), loaded once per process.

    Args:
        vae: the VAE spec, or None for pixel-space models.
        device: where the VAE runs.
        norm: the latent normalisation x was made with, inverted before decoding: a `LatentNorm`, a manifest's
            `latent_norm` entry (dict), or a `repa prepare` folder or its `manifest.json` (`LatentShards.latent_norm`,
            `run_latent_norm(cfg)`); None = the VAE's own (SD-VAE: x / 0.18215, as before).
    """
    if vae is None:
        return to_uint8
    latent_norm = LatentNorm.from_json(norm) if isinstance(norm, Mapping) else norm
    if latent_norm is not None and not isinstance(latent_norm, LatentNorm):
        latent_norm = read_latent_norm(latent_norm)
    key = (vae, str(device), latent_norm)
    if key not in _VAE_DECODERS:
        if (vae, str(device)) not in _VAES:
            _VAES[(vae, str(device))] = load_vae(vae, device)
        model = _VAES[(vae, str(device))]
        if latent_norm is not None:
            latent_norm.check_channels(model.latent_channels, f"the latents decoded by {vae}")
        _VAE_DECODERS[key] = partial(model.decode_to_uint8, norm=latent_norm)
    return _VAE_DECODERS[key]


def apply_sample_overrides(cfg: Config, overrides: dict[str, Any]) -> None:
    """Set `cfg.sample` fields from a dict, skipping None values (unknown keys are errors)."""
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(cfg.sample, key):
            raise ValueError(f"unknown sample setting {key!r}")
        setattr(cfg.sample, key, value)
    if not 0.0 <= cfg.sample.guidance_low <= cfg.sample.guidance_high <= 1.0:
        raise ValueError("the guidance interval must satisfy 0 <= guidance_low <= guidance_high <= 1")


def sample_settings(cfg: Config) -> dict[str, Any]:
    """The sampler settings recorded beside generated samples."""
    return {k: getattr(cfg.sample, k) for k in SAMPLE_KEYS}


def sample_stem(name: str, cfg: Config, num: int, seed: int) -> str:
    """File stem of a sample batch: checkpoint name, sampler, steps, guidance scale, count and seed."""
    s = cfg.sample
    return f"{name}-{s.sampler}{s.num_steps}-cfg{s.cfg_scale:g}-n{num}-seed{seed}"


def grid_labels(num: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., num_classes-1, 0, 1, ... so each grid row cycles the classes."""
    return torch.arange(num) % num_classes


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, min_cell: int = 64) -> None:
    """uint8 (B, C, H, W) -> one PNG grid with a 2-pixel border; cells smaller than `min_cell` pixels are
    enlarged by an integer factor (nearest neighbour) so small images stay legible."""
    scale = max(1, min_cell // images.shape[-1])
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    b, c, h, w = images.shape
    ncol = nrow
    nrows = (b + ncol - 1) // ncol
    pad = 2
    canvas = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        row, col = divmod(i, ncol)
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        canvas[:, top : top + h, left : left + w] = images[i]
    arr = canvas.permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)


def to_adm_nhwc(images: torch.Tensor) -> np.ndarray:
    """uint8 (B, C, H, W) -> the ADM evaluator's RGB NHWC numpy layout (grayscale repeated)."""
    nhwc = images.permute(0, 2, 3, 1)
    if nhwc.shape[-1] == 1:
        nhwc = nhwc.expand(-1, -1, -1, 3)
    return nhwc.contiguous().numpy()


def write_samples(images: torch.Tensor, labels: torch.Tensor, stem: str | Path, nrow: int) -> tuple[Path, Path]:
    """`<stem>.png` (a grid of the first 100 images) and `<stem>.npz` (ADM layout: `arr_0` RGB NHWC, `arr_1`)."""
    stem = Path(stem)
    png, npz = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".npz")
    save_grid(images[:100], png, nrow=nrow)
    save_samples(npz, to_adm_nhwc(images), labels.numpy())
    return png, npz
