"""REPA-E's trainable VAE: a diffusers AutoencoderKL with the latent BatchNorm in front of the diffusion model, its
file (`vae.safetensors` in a checkpoint) and its export as a diffusers folder.

REPA-E (Leng et al., ICCV 2025) normalises the VAE latents with a BatchNorm without affine parameters: in training
the diffusion model sees `bn(z)` (batch statistics, running statistics updated); sampling and decoding invert the
running statistics, `z = x * sqrt(running_var + eps) + running_mean` (`TunedVAE.latent_norm`, a per-channel
`LatentNorm`). The file holds the AutoencoderKL weights under `vae.`, the BatchNorm's buffers under `bn.`, and in
its safetensors metadata the AutoencoderKL config and the BatchNorm's eps and momentum, so it loads without the VAE
the run started from. `export` writes a `save_pretrained` folder whose config carries the statistics as diffusers'
`latents_mean` / `latents_std` (scaling_factor 1): `load_vae(folder)` (`repa prepare`, `repa train`) then normalises
exactly as the run's BatchNorm did (`LatentNorm.from_vae_config`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from repa.data.vae import VAE, AutoencoderGeometry, LatentNorm, to_uint8

FILE_FORMAT = "repa-tuned-vae/1"
LATENT_BN_EPS = 1e-4  # REPA-E's latent BatchNorm eps (official models/sit.py: BatchNorm2d(eps=1e-4))
LATENT_BN_MOMENTUM = 0.1  # REPA-E's --bn-momentum default


class LatentBatchNorm(nn.BatchNorm2d):
    """`BatchNorm2d(C, affine=False)`: the diffusion model's view of the latents, x = (z - mean) / sqrt(var + eps).

    `forward` in train mode uses the batch statistics and updates the running ones (the diffusion model's pass);
    `normalize_running` always uses the running statistics and is differentiable in z (the VAE's alignment pass).
    """

    def __init__(self, channels: int, momentum: float = LATENT_BN_MOMENTUM, eps: float = LATENT_BN_EPS) -> None:
        super().__init__(channels, eps=eps, momentum=momentum, affine=False, track_running_stats=True)

    def normalize_running(self, z: torch.Tensor) -> torch.Tensor:
        """(z - running_mean) / sqrt(running_var + eps), whatever the mode; no statistic is updated."""
        return F.batch_norm(z, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)

    @torch.no_grad()
    def init_from(self, norm: LatentNorm) -> None:
        """REPA-E's `init_bn`: the running statistics from the starting VAE's latent normalisation x = (z - shift) *
        scale, i.e. running_mean = shift and running_var = 1 / scale^2 (per channel; scalars broadcast). SD-VAE's
        0.18215 gives mean 0, var 30.1, a dataset-measured normalisation its mean and variance."""
        c = self.num_features
        for name, value in (("running_mean", norm.shift), ("running_var", norm.scale)):
            v = torch.as_tensor(value, dtype=torch.float64).expand(c) if not isinstance(value, tuple) else (
                torch.tensor(value, dtype=torch.float64))  # fmt: skip
            if v.numel() != c:
                raise ValueError(f"the VAE's latent normalisation has {v.numel()} channels, its latents {c}")
            getattr(self, name).copy_(v if name == "running_mean" else v.pow(-2))

    def std(self) -> torch.Tensor:
        """sqrt(running_var + eps) per channel: what decoding multiplies x by."""
        return torch.sqrt(self.running_var + self.eps)

    def latent_norm(self) -> LatentNorm:
        """The running statistics as a per-channel `LatentNorm` (scale 1 / std, shift mean)."""
        std = self.std().double()
        return LatentNorm(scale=tuple((1.0 / std).tolist()), shift=tuple(self.running_mean.double().tolist()),
                          source="latent-bn")  # fmt: skip


def _config_dict(autoencoder: nn.Module) -> dict[str, Any]:
    """The AutoencoderKL's constructor config (diffusers' private `_` keys left out), JSON-serialisable."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(autoencoder.config).items()
            if not k.startswith("_")}  # fmt: skip


class TunedVAE(AutoencoderGeometry):
    """A trainable AutoencoderKL (`vae`) and the latent BatchNorm (`bn`). Images are float in [-1, 1] (B, 3, H, W).

    Args:
        autoencoder: a diffusers AutoencoderKL; its parameters are made trainable.
        momentum, eps: the BatchNorm's.
    """

    def __init__(self, autoencoder: nn.Module, momentum: float = LATENT_BN_MOMENTUM, eps: float = LATENT_BN_EPS):
        super().__init__()
        self.vae = autoencoder
        self.vae.requires_grad_(True)
        self.bn = LatentBatchNorm(int(autoencoder.config.latent_channels), momentum=momentum, eps=eps)
        param = next(autoencoder.parameters())
        self.bn.to(device=param.device)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents z -> images (float, about [-1, 1])."""
        return self.vae.decode(z).sample

    @torch.no_grad()
    def decode_to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """The diffusion model's x -> uint8 images: decode(x * sqrt(running_var + eps) + running_mean)."""
        param = next(self.vae.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        z = x * self.bn.std().view(-1, 1, 1).to(x.dtype) + self.bn.running_mean.view(-1, 1, 1).to(x.dtype)
        return to_uint8(self.decode_latents(z))

    def latent_norm(self) -> LatentNorm:
        return self.bn.latent_norm()

    def file_metadata(self) -> dict[str, str]:
        """The safetensors metadata of `vae.safetensors`: format, AutoencoderKL config, BatchNorm eps/momentum."""
        return {"format": FILE_FORMAT, "vae_config": json.dumps(_config_dict(self.vae)),
                "bn_eps": repr(float(self.bn.eps)), "bn_momentum": repr(float(self.bn.momentum))}  # fmt: skip

    def save(self, path: str | Path) -> None:
        """Write the weights, the BatchNorm buffers and the metadata to one safetensors file."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata=self.file_metadata())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TunedVAE:
        """A `TunedVAE` from a file written by `save` (or a checkpoint's `vae.safetensors`).

        Raises:
            ValueError: the file is not a tuned-VAE file.
        """
        from diffusers import AutoencoderKL  # lazy: heavy, only latent runs need it

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as err:  # noqa: BLE001 - OSError, SafetensorError
            raise ValueError(f"cannot read the tuned VAE {path}: {type(err).__name__}: {err}") from err
        if meta.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a REPA-E tuned VAE (metadata format {meta.get('format')!r})")
        autoencoder = AutoencoderKL.from_config(json.loads(meta["vae_config"]))
        out = cls(autoencoder, momentum=float(meta["bn_momentum"]), eps=float(meta["bn_eps"]))
        out.load_state_dict(load_file(str(path)), strict=True)
        return out.to(device)

    def export(self, out: str | Path) -> Path:
        """A diffusers folder (`save_pretrained`) whose config's `latents_mean` / `latents_std` are the BatchNorm's
        running mean and sqrt(running_var + eps), with scaling_factor 1 (`LatentNorm.from_vae_config`'s rule:
        x = (z - latents_mean) * scaling_factor / latents_std, REPA-E's BatchNorm)."""
        mean, std = self.bn.running_mean.double().tolist(), self.bn.std().double().tolist()
        if not all(math.isfinite(v) for v in mean + std):
            raise ValueError("the latent BatchNorm's running statistics are not finite: nothing to export")
        return save_with_latent_statistics(self.vae, out, mean, std)


def save_with_latent_statistics(autoencoder: nn.Module, out: str | Path, mean: list[float], std: list[float]) -> Path:
    """Write an AutoencoderKL as a diffusers folder (`save_pretrained`) whose config carries per-channel latent
    statistics as `latents_mean` / `latents_std` with scaling_factor 1, so that `load_vae(out)` normalises x = (z -
    mean) / std (`LatentNorm.from_vae_config`): REPA-E's exported VAE, `repa train-vae`'s."""
    from diffusers import AutoencoderKL  # lazy: heavy, only latent runs need it

    config = {**_config_dict(autoencoder), "scaling_factor": 1.0, "shift_factor": None, "latents_mean": mean,
              "latents_std": std}  # fmt: skip
    exported = AutoencoderKL.from_config(config)
    exported.load_state_dict(autoencoder.state_dict(), strict=True)
    exported.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def load_tuned_vae(path: str | Path, device: str | torch.device = "cpu") -> VAE:
    """The frozen `VAE` of a tuned-VAE file: its AutoencoderKL, normalising with its BatchNorm's running statistics."""
    tuned = TunedVAE.load(path, device)
    vae = VAE(tuned.vae, source=str(path), norm=tuned.latent_norm())
    return vae.to(device)


def export_tuned_vae(path: str | Path, out: str | Path) -> Path:
    """Write the tuned VAE of `path` (a checkpoint's `vae.safetensors`) as a diffusers folder `out`."""
    return TunedVAE.load(path).export(out)
