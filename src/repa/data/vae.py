"""VAEs (diffusers `AutoencoderKL`: SD-VAE `stabilityai/sd-vae-ft-ema` / `-mse`, SD3 / FLUX.1-style 16-channel
VAEs, REPA-E's end-to-end-tuned ones): images <-> latents, and the latent normalisation.

Latent-space REPA trains on `x = (z - shift) * scale` with `z = mean + std * eps` a fresh sample of the VAE posterior
whose (mean, std) are stored once per image (official REPA: posterior moments precomputed, a fresh sample each step,
scale 0.18215, shift 0). `LatentNorm` holds (shift, scale), scalars or one value per latent channel; its exact
inverse `z = x / scale + shift` is what decoding applies. Where the numbers come from (`LatentNorm.from_vae_config`,
diffusers' conventions):

- `latents_mean` and `latents_std` in the config (per channel): shift = latents_mean,
  scale = scaling_factor / latents_std, as diffusers' SDXL pipelines do (`(z - mean) * scaling_factor / std`;
  REPA-E's T2I trainer uses 1 / latents_std and ignores scaling_factor: the two agree when scaling_factor is 1);
- else `shift_factor` (SD3: 0.0609, FLUX.1: 0.1159): shift = shift_factor, scale = scaling_factor
  (diffusers' SD3 / FLUX pipelines decode `x / scaling_factor + shift_factor`);
- else shift 0 and scale = scaling_factor (0.18215, `LATENT_SCALE`, for SD-VAE: bit-identical to a plain
  `z * 0.18215`).

`repa prepare --latent-norm dataset` instead measures a per-channel mean and std over the prepared latents (REPA-E's
own recipe: a BatchNorm's running statistics of the latents, i.e. unit variance per channel) and stores them in the
manifest (`repa.data.shard_writer.dataset_latent_norm`). `LATENT_SCALE` is the only definition of 0.18215 here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repa.assets import hub_offline
from repa.errors import brief

LATENT_SCALE = 0.18215  # SD-VAE latent scaling (Rombach et al. 2022), used by DiT/SiT/REPA
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"

Number = float | tuple[float, ...]


def _values(v: float | Sequence[float], what: str) -> Number:
    """A finite float, or a tuple of finite floats (one per channel)."""
    out = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)
    vals = out if isinstance(out, tuple) else (out,)
    if not vals or not all(math.isfinite(x) for x in vals):
        raise ValueError(f"latent normalisation: {what} must be finite numbers, got {v!r}")
    return out


@dataclass(frozen=True)
class LatentNorm:
    """The diffusion model's view of VAE latents: `x = (z - shift) * scale`, and back `z = x / scale + shift`.

    Attributes:
        scale: a float, or one float per latent channel (non-zero).
        shift: a float, or one float per latent channel.
        source: where the numbers come from: "vae" (the VAE's config), "dataset" (measured over the prepared
            latents), "default" (0.18215, no shift) or "manifest" (an older manifest's `latent_scale`).
    """

    scale: Number = LATENT_SCALE
    shift: Number = 0.0
    source: str = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _values(self.scale, "scale"))
        object.__setattr__(self, "shift", _values(self.shift, "shift"))
        scales = self.scale if isinstance(self.scale, tuple) else (self.scale,)
        if any(v == 0 for v in scales):
            raise ValueError(f"latent normalisation: scale must be non-zero, got {self.scale!r}")
        lengths = {len(v) for v in (self.scale, self.shift) if isinstance(v, tuple)}
        if len(lengths) > 1:
            raise ValueError(f"latent normalisation: scale and shift have different channel counts {sorted(lengths)}")

    @property
    def per_channel(self) -> bool:
        return isinstance(self.scale, tuple) or isinstance(self.shift, tuple)

    @property
    def channels(self) -> int | None:
        """The number of channels the per-channel values are for (None for scalars)."""
        for v in (self.scale, self.shift):
            if isinstance(v, tuple):
                return len(v)
        return None

    @property
    def scalar_scale(self) -> float | None:
        """The scale when the normalisation is a plain scalar multiplication (no shift), else None."""
        return None if self.per_channel or self.shift != 0.0 else float(self.scale)  # type: ignore[arg-type]

    def check_channels(self, channels: int, where: str = "") -> None:
        """Raise ValueError if per-channel values do not match `channels` latent channels."""
        if self.channels is not None and self.channels != channels:
            raise ValueError(
                f"latent normalisation{f' of {where}' if where else ''} has {self.channels} channels, "
                f"the latents have {channels}"
            )

    @staticmethod
    def _tensor(v: Number, like: torch.Tensor) -> torch.Tensor | float:
        if not isinstance(v, tuple):
            return v
        return torch.tensor(v, dtype=like.dtype if like.is_floating_point() else torch.float32,
                            device=like.device).view(-1, 1, 1)  # fmt: skip

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents z (..., C, h, w) -> the diffusion model's x = (z - shift) * scale."""
        if self.per_channel:
            self.check_channels(z.shape[-3])
        if self.shift == 0.0:  # exactly `z * scale` (SD-VAE: bit-identical to the historical expression)
            return z * self._tensor(self.scale, z)
        return (z - self._tensor(self.shift, z)) * self._tensor(self.scale, z)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The exact inverse of `normalize`: z = x / scale + shift."""
        if self.per_channel:
            self.check_channels(x.shape[-3])
        z = x / self._tensor(self.scale, x)
        return z if self.shift == 0.0 else z + self._tensor(self.shift, z)

    def to_json(self) -> dict[str, Any]:
        """{"source", "scale", "shift"}: floats or lists, as the manifest records them."""

        def plain(v: Number) -> float | list[float]:
            return list(v) if isinstance(v, tuple) else v

        return {"source": self.source, "scale": plain(self.scale), "shift": plain(self.shift)}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> LatentNorm:
        """The inverse of `to_json` (extra keys, e.g. the dataset statistics, are ignored)."""
        try:
            return cls(scale=entry["scale"], shift=entry.get("shift", 0.0), source=str(entry.get("source", "")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a latent normalisation entry: {dict(entry)!r} ({type(e).__name__}: {e})") from e

    @classmethod
    def from_vae_config(cls, config: Any) -> LatentNorm:
        """The normalisation a diffusers VAE config implies (see the module docstring for the rules)."""

        def get(key: str) -> Any:
            return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

        factor = get("scaling_factor")
        factor = LATENT_SCALE if factor is None else float(factor)
        mean, std = get("latents_mean"), get("latents_std")
        if mean is not None and std is not None:
            if len(mean) != len(std):
                raise ValueError(f"the VAE config's latents_mean ({len(mean)}) and latents_std ({len(std)}) differ")
            return cls(scale=tuple(factor / float(s) for s in std), shift=tuple(float(m) for m in mean), source="vae")
        shift = get("shift_factor")
        return cls(scale=factor, shift=0.0 if shift is None else float(shift), source="vae")

    @classmethod
    def from_statistics(cls, mean: Sequence[float], std: Sequence[float]) -> LatentNorm:
        """Per-channel standardisation x = (z - mean) / std (REPA-E's BatchNorm of latents)."""
        if len(mean) != len(std) or any(not (s > 0) for s in std):
            raise ValueError(f"per-channel latent statistics need one positive std per mean, got {list(std)}")
        return cls(scale=tuple(1.0 / float(s) for s in std), shift=tuple(float(m) for m in mean), source="dataset")


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (x = image / 127.5 - 1: the pixel convention of training and encoding)."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (B, C, H, W) -> uint8, clamped and rounded (the one decoder of pixels to bytes)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _sd_layout(block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int) -> dict[str, Any]:
    """AutoencoderKL kwargs with SD-VAE's block layout at the given widths (4 widths = 4 levels = /8 latents)."""
    levels = len(block_out_channels)
    return dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                norm_num_groups=norm_num_groups, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels)  # fmt: skip


# The 16-channel VAEs of SD3 and FLUX.1 (diffusers AutoencoderKL configs of `stabilityai/stable-diffusion-3-medium-
# diffusers` and `black-forest-labs/FLUX.1-dev` / `-schnell`, subfolder vae): the SD-VAE blocks with 16 latent
# channels, no quant / post-quant convolutions, and a scalar shift besides the scale.
_SD3_FLUX_LAYOUT = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
_SD3_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)
_FLUX_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)

# `random:<preset>` VAE specs: randomly initialised AutoencoderKL configs (tests, benchmarks; nothing is downloaded).
RANDOM_VAE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},  # VAE.from_config's default: 2 levels, /2 latents
    "small": _sd_layout((8, 16, 16, 16), 1, 8),  # the SD-VAE layout at a small width
    "sd": _sd_layout((128, 256, 512, 512), 2, 32),  # the full SD-VAE architecture (kl-f8): speed/memory measurements
    "flux": {**_sd_layout((128, 256, 512, 512), 2, 32), **_SD3_FLUX_LAYOUT, **_FLUX_FACTORS},  # FLUX.1's VAE, /8
    "flux-small": {**_sd_layout((8, 16, 16, 16), 1, 8), **_SD3_FLUX_LAYOUT, **_FLUX_FACTORS},  # the same, narrow
    "sd3": {**_sd_layout((128, 256, 512, 512), 2, 32), **_SD3_FLUX_LAYOUT, **_SD3_FACTORS},  # SD3's VAE, /8
}


class AutoencoderGeometry(nn.Module):
    """What a wrapper of a diffusers AutoencoderKL (`self.vae`) reads off its config: pixels per latent side, latent
    and image channels (the frozen `VAE` and REPA-E's trainable `TunedVAE` share them)."""

    vae: nn.Module

    @property
    def downsample(self) -> int:
        """Pixels per latent side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def in_channels(self) -> int:
        return int(self.vae.config.in_channels)


class VAE(AutoencoderGeometry):
    """Frozen, eval-mode VAE wrapper. Images are float in [-1, 1], (B, 3, H, W); latents (B, C, H/f, W/f).

    Args:
        vae: a diffusers AutoencoderKL (or a module with its `encode` / `decode` / `config`).
        scale: a plain scalar scale (no shift) instead of what the config says.
        source: the spec it was loaded from (recorded in manifests).
        norm: the latent normalisation (default: `LatentNorm.from_vae_config(vae.config)`, which is
            scale 0.18215 and no shift for SD-VAE; 0.18215 when the module has no config).
    """

    def __init__(
        self, vae: nn.Module, scale: float | None = None, source: str = "", norm: LatentNorm | None = None
    ) -> None:
        super().__init__()
        self.vae = vae
        if norm is None:
            config = getattr(vae, "config", None)
            if scale is not None:
                norm = LatentNorm(scale=float(scale))
            else:  # no config: SD-VAE's 0.18215
                norm = LatentNorm() if config is None else LatentNorm.from_vae_config(config)
        self.norm = norm
        self.source = source
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.train(False)

    @property
    def scale(self) -> float:
        """The scalar latent scale; a VAE whose normalisation has a shift or per-channel values has none (use
        `normalize` / `denormalize`), and asking for it is an error rather than a silently wrong number."""
        value = self.norm.scalar_scale
        if value is None:
            raise ValueError(
                f"the VAE {self.source or ''} normalises latents with a shift or per channel ({self.norm.to_json()}): "
                "use VAE.normalize / VAE.denormalize instead of a scalar scale"
            )
        return value

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the diffusion model's x (`LatentNorm.normalize` with this VAE's normalisation)."""
        return self.norm.normalize(z)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm.denormalize(x)

    def train(self, mode: bool = True) -> VAE:
        """Always eval mode (frozen)."""
        return super().train(False)

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
            vae = AutoencoderKL.from_pretrained(str(name_or_path), local_files_only=local or hub_offline(),
                                                torch_dtype=dtype)  # fmt: skip
        except Exception as e:  # OSError / hub HTTP errors: the weights are not available here
            raise RuntimeError(
                f"cannot load the VAE {name_or_path!s}: {brief(e)}"
                f". To fix: download it once with network access (`hf download {name_or_path}`; it is then cached), "
                "run with HF_HUB_OFFLINE=1 to use the local Hugging Face cache only, pass a local folder saved "
                "with `AutoencoderKL.save_pretrained`, or train a small one on the run's images with `repa train-vae "
                "CONFIG FOLDER`."
            ) from e
        return cls(vae.to(device=device), source=str(name_or_path))

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

        config = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, **_sd_layout((16, 32), 1, 8), **overrides}
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
        """A posterior sample, normalised for the diffusion model: (mean + std * eps - shift) * scale."""
        return sample_latents(mean, std, generator, self.norm)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, norm: LatentNorm | None = None) -> torch.Tensor:
        """Normalised latents x (B, C, h, w) -> images float32 in about [-1, 1] (B, 3, h*f, w*f).

        Args:
            latents: the diffusion model's x.
            norm: the normalisation x was made with (default: this VAE's; `repa prepare --latent-norm dataset`
                shards carry their own, `repa.data.shards.LatentShards.latent_norm`).
        """
        param = next(self.vae.parameters())
        z = (norm or self.norm).denormalize(latents.to(device=param.device, dtype=param.dtype))
        return self.vae.decode(z).sample.float()

    def decode_to_uint8(self, latents: torch.Tensor, norm: LatentNorm | None = None) -> torch.Tensor:
        """Normalised latents -> uint8 images (B, 3, H, W)."""
        return to_uint8(self.decode(latents, norm))


def sample_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator | None = None,
    scale: float | LatentNorm = LATENT_SCALE,
) -> torch.Tensor:
    """`scale`'s normalisation of z = mean + std * eps, eps ~ N(0, I) drawn from `generator` (on the tensors'
    device); a float scale means (mean + std * eps) * scale."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    if isinstance(scale, LatentNorm):
        return scale.normalize(mean + std * eps)
    return (mean + std * eps) * scale
