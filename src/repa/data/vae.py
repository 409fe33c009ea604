"""Stable Diffusion VAE (diffusers `AutoencoderKL`, `stabilityai/sd-vae-ft-ema` / `-mse`): images <-> latents.

Latent-space REPA trains on `(mean + std * eps) * LATENT_SCALE` with (mean, std) of the VAE posterior stored once
per image (official REPA: posterior moments precomputed, a fresh sample each step, scale 0.18215, bias 0).
`LATENT_SCALE` is the only definition of that constant in the project.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repa.assets import hub_offline

LATENT_SCALE = 0.18215  # SD-VAE latent scaling (Rombach et al. 2022), used by DiT/SiT/REPA
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


def _sd_layout(block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int) -> dict[str, Any]:
    """AutoencoderKL kwargs with SD-VAE's block layout at the given widths (4 widths = 4 levels = /8 latents)."""
    levels = len(block_out_channels)
    return dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                norm_num_groups=norm_num_groups, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels)  # fmt: skip


# `random:<preset>` VAE specs: randomly initialised AutoencoderKL configs (tests, benchmarks; nothing is downloaded).
RANDOM_VAE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},  # VAE.from_config's default: 2 levels, /2 latents
    "small": _sd_layout((8, 16, 16, 16), 1, 8),  # the SD-VAE layout at a small width
    "sd": _sd_layout((128, 256, 512, 512), 2, 32),  # the full SD-VAE architecture (kl-f8): speed/memory measurements
}


class VAE(nn.Module):
    """Frozen, eval-mode SD-VAE wrapper. Images are float in [-1, 1], (B, 3, H, W); latents (B, 4, H/8, W/8)."""

    def __init__(self, vae: nn.Module, scale: float = LATENT_SCALE, source: str = "") -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(scale)
        self.source = source
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VAE:
        """Always eval mode (frozen)."""
        return super().train(False)

    @property
    def downsample(self) -> int:
        """Pixels per latent side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_VAE,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> VAE:
        """Load a diffusers AutoencoderKL (hub id or local folder); one clear error when unavailable.

        Args:
            name_or_path: hub id (`stabilityai/sd-vae-ft-ema` or `-mse`) or a `save_pretrained` folder.
            device: target device.
            dtype: parameter dtype (float32 recommended for encoding).

        Returns:
            The frozen wrapper.
        """
        from diffusers import AutoencoderKL  # lazy: diffusers is heavy and only latent runs need it

        local = Path(name_or_path).is_dir()
        try:
            vae = AutoencoderKL.from_pretrained(str(name_or_path), local_files_only=local or hub_offline())
        except Exception as e:  # OSError / hub HTTP errors: the weights are not available here
            raise RuntimeError(
                f"cannot load the VAE {name_or_path!s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                f". To fix: download it once with network access (`hf download {name_or_path}`; it is then cached), "
                "run with HF_HUB_OFFLINE=1 to use the local Hugging Face cache only, or pass a local folder saved "
                "with `AutoencoderKL.save_pretrained`."
            ) from e
        return cls(vae.to(device=device, dtype=dtype), source=str(name_or_path))

    @classmethod
    def from_config(cls, seed: int = 0, **overrides: Any) -> VAE:
        """Randomly initialised AutoencoderKL (tests): a small SD-VAE-shaped config unless overridden.

        Args:
            seed: init seed.
            **overrides: AutoencoderKL config kwargs (the default is tiny: 2 levels, 8x fewer channels, /2 latents).

        Returns:
            The frozen wrapper.
        """
        from diffusers import AutoencoderKL

        config = dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        )  # fmt: skip
        config.update(overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**config)
        return cls(vae, source=f"random-init(seed={seed})")

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) of images in [-1, 1] (B, 3, H, W) -> two (B, C, H/f, W/f) float32 tensors."""
        param = next(self.vae.parameters())
        dist = self.vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample_latents(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A posterior sample, scaled for the diffusion model: (mean + std * eps) * LATENT_SCALE."""
        return sample_latents(mean, std, generator, self.scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images float32 in about [-1, 1] (B, 3, h*f, w*f)."""
        param = next(self.vae.parameters())
        return self.vae.decode(latents.to(device=param.device, dtype=param.dtype) / self.scale).sample.float()

    def decode_to_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> uint8 images (B, 3, H, W)."""
        return ((self.decode(latents).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None, scale: float = LATENT_SCALE
) -> torch.Tensor:
    """(mean + std * eps) * scale with eps ~ N(0, I) drawn from `generator` (on the tensors' device)."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale


def load_vae(spec: str, device: str | torch.device = "cpu") -> VAE:
    """A `VAE` from a hub id / local folder, or `random[:preset|{json}]` (random init, seed 0).

    Args:
        spec: "stabilityai/sd-vae-ft-ema", a `save_pretrained` folder, "random:small", 'random:{"layers_per_block": 1}'.
        device: target device.

    Returns:
        the frozen VAE wrapper.
    """
    if spec == "random" or spec.startswith("random:"):
        what = spec.partition(":")[2] or "tiny"
        if what.startswith("{"):
            overrides = json.loads(what)
        elif what in RANDOM_VAE_PRESETS:
            overrides = RANDOM_VAE_PRESETS[what]
        else:
            raise ValueError(f"VAE {spec!r}: unknown preset {what!r}; use one of {sorted(RANDOM_VAE_PRESETS)} or JSON")
        vae = VAE.from_config(seed=0, **overrides)
        vae.source = f"random:{what}"
        return vae.to(device)
    return VAE.from_pretrained(spec, device=device)
