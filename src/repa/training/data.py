"""Training data as the loop sees it (`TrainingData`): clean inputs x, labels, uint8 images for encoders, targets.

Three kinds follow the one protocol: `InMemoryImages` (pixel space; encoder targets computed once and cached),
`PrecomputedLatents` (the same images in the latent space of a frozen VAE, encoded once at start) and
`repa.data.shards.LatentShards` (VAE latents from `repa prepare`; targets stored beside them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from repa.config import Config
from repa.data.features import images_fingerprint
from repa.data.folder import load_image_folder
from repa.data.shards import LatentShards
from repa.data.sources import balanced_subset, check_labels, fashion_mnist_images
from repa.data.vae import LatentNorm, from_uint8
from repa.data.vae_spec import load_vae

TargetSpec = tuple[str, int, tuple[int, int]]  # (encoder name, embed_dim, token grid)


class TrainingData(Protocol):
    """What the loop needs of its data, whatever it is."""

    name: str
    num_classes: int
    needs_posterior: bool  # x is a fresh VAE posterior sample each step: the loop draws its eps
    stores_targets: bool  # encoder targets are stored with the data (`target_specs`, `check_encoders`)
    has_images: bool  # uint8 images are available for running encoders online

    @property
    def num_items(self) -> int: ...

    @property
    def sample_shape(self) -> tuple[int, int, int]: ...

    @property
    def vae(self) -> str | None:
        """The VAE that decodes x to images (a `repa.data.vae_spec.load_vae` spec); None when x is pixels."""

    @property
    def latent_norm(self) -> object | None:
        """The latent normalisation x was made with (`repa.data.vae.LatentNorm`); None: pixels or the VAE's own."""

    def batch(
        self, idx: torch.Tensor, flips: torch.Tensor, device: torch.device, *, eps: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Items `idx` (mirrored where `flips`): x, y, and `images` / `targets` where available."""


@dataclass
class InMemoryImages:
    """A uint8 image tensor (N, C, H, W) with labels; pixel-space training reads x = images / 127.5 - 1."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    num_classes: int
    name: str
    targets: list[torch.Tensor] = field(default_factory=list)  # per encoder: (num_flips, N, T, D)
    class_tokens: torch.Tensor | None = None  # REG: encoder 0's cached global tokens (num_flips, N, D)
    needs_posterior: ClassVar[bool] = False
    stores_targets: ClassVar[bool] = False
    has_images: ClassVar[bool] = True
    vae: ClassVar[None] = None
    latent_norm: ClassVar[None] = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.labels) != len(self.images):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        check_labels(self.labels, self.num_classes, self.name)

    @property
    def num_items(self) -> int:
        return len(self.images)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """Content hash (images + labels) identifying this exact training set for target caches."""
        return images_fingerprint(self.images, self.labels)

    def batch(
        self, idx: torch.Tensor, flips: torch.Tensor, device: torch.device, *, eps: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Items `idx` with horizontal flips where `flips`; x in [-1, 1], images uint8 (for encoders).
        (`eps` is accepted for interface parity with latent shards, whose x is a posterior sample.)"""
        images = self.images[idx]
        if flips.any():
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        out = {
            "images": images.to(device),
            "x": from_uint8(images.to(device)),
            "y": self.labels[idx].to(device),
        }
        if self.targets:
            f = flips.long()  # clamped to 0 where the targets were cached without mirror images
            out["targets"] = [
                t[f.clamp(max=t.shape[0] - 1), idx].to(device=device, dtype=torch.float32) for t in self.targets
            ]
            if self.class_tokens is not None:  # REG's target layout: encoder 0's global token first (B, 1 + T, D)
                cls = self.class_tokens[f.clamp(max=self.class_tokens.shape[0] - 1), idx].to(device, torch.float32)
                out["targets"][0] = torch.cat([cls[:, None], out["targets"][0]], dim=1)
        return out


@dataclass
class PrecomputedLatents(InMemoryImages):
    """In-memory images trained in the latent space of a frozen VAE (`data.space=latent` with data.kind=fashion-mnist
    or folder, no REPA-E): every image, and its mirror image with `data.hflip`, is encoded once into the VAE's
    posterior moments; each step draws x = norm(mean + std * eps) with the loop's eps, as latent shards do. Encoder
    targets come from the images as in pixel space. (For large datasets `repa prepare` stores the same on disk.)"""

    mean: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (num_flips, N, C, h, w) float32
    std: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    vae: str = ""  # type: ignore[assignment]  # the frozen VAE's spec (pixel-space data has None)
    norm: LatentNorm = field(default_factory=LatentNorm)  # the VAE's own normalisation (what decoding inverts)
    needs_posterior: ClassVar[bool] = True

    @property
    def sample_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return tuple(self.mean.shape[2:])  # type: ignore[return-value]

    def batch(
        self, idx: torch.Tensor, flips: torch.Tensor, device: torch.device, *, eps: torch.Tensor | None = None
    ) -> dict[str, Any]:
        out = super().batch(idx, flips, device)
        f = flips.long().clamp(max=self.mean.shape[0] - 1)
        mean, std = self.mean[f, idx], self.std[f, idx]
        if eps is None:
            raise ValueError("PrecomputedLatents.batch needs the step's posterior draw eps")
        z = mean + std * eps.to(mean.dtype)
        out["x"] = self.norm.normalize(z).to(device)
        return out


def encode_images(data: InMemoryImages, vae_spec: str, hflip: bool, batch_size: int = 250) -> PrecomputedLatents:
    """`data` in the latent space of the frozen VAE `vae_spec` (on the CPU; loaded once per process)."""
    vae = load_vae(vae_spec)
    c, h, w = data.sample_shape
    f, vae_c = vae.downsample, vae.in_channels
    if c not in (1, vae_c) or h % f or w % f:
        raise ValueError(f"the VAE {vae_spec} encodes {vae_c}-channel images with sides divisible by {f}; the training "
                         f"images are {c}x{h}x{w}")  # fmt: skip
    means, stds = [], []  # per flip: (N, C, h, w)
    for flip in (False, True)[: 1 + hflip]:
        pixels = (from_uint8(batch.flip(-1) if flip else batch) for batch in data.images.split(batch_size))
        m, s = zip(*(vae.encode_moments(x.expand(-1, vae_c, -1, -1) if c == 1 else x) for x in pixels))
        means.append(torch.cat(m))
        stds.append(torch.cat(s))
    return PrecomputedLatents(data.images, data.labels, data.num_classes, data.name, targets=data.targets,
                         class_tokens=data.class_tokens, mean=torch.stack(means), std=torch.stack(stds),
                         vae=vae_spec, norm=vae.norm)  # fmt: skip


def load_train_images(cfg: Config) -> TrainingData:
    """The training set: in-memory images for pixel-space runs, memory-mapped shards for `data.kind=latents`."""
    d = cfg.data
    if d.kind == "latents":
        return load_latent_shards(cfg)
    if d.kind == "fashion-mnist":  # the IDX reader refuses labels outside [0, 10) before the subset could drop them
        images, labels = fashion_mnist_images("train", d.num_train, d.root)
        return _in_space(cfg, InMemoryImages(images, labels, 10, "fashion-mnist"))
    if d.kind == "folder":
        if d.root is None:
            raise ValueError("data.kind=folder needs data.root (an ImageNet-layout folder of class subfolders)")
        images, labels, classes = load_image_folder(d.root, d.resolution)
        keep = balanced_subset(labels, d.num_train, len(classes))
        return _in_space(cfg, InMemoryImages(images[keep], labels[keep], len(classes), f"folder:{d.root}"))
    raise ValueError(f"unknown data.kind={d.kind}")


def _in_space(cfg: Config, data: InMemoryImages) -> InMemoryImages:
    """Pixel space as is; latent space encoded by the frozen `data.vae` (REPA-E encodes with its own trainable VAE)."""
    if cfg.data.space != "latent" or cfg.train.end_to_end:
        return data
    return encode_images(data, cfg.data.vae, cfg.data.hflip)


def load_latent_shards(cfg: Config) -> LatentShards:
    """Shards written by `repa prepare`, checked against the run's config before any work."""
    d = cfg.data
    if d.root is None:
        raise ValueError("data.kind=latents needs data.root (a folder written by `repa prepare SRC OUT`)")
    shards = LatentShards(d.root)
    resolution = shards.manifest["config"]["resolution"]
    if resolution != d.resolution:
        raise ValueError(f"{d.root} was prepared at {resolution} px but data.resolution={d.resolution}")
    if d.num_train is not None:
        raise ValueError("data.num_train subsets in-memory datasets only; prepare a smaller folder for shards")
    if d.hflip and not shards.has_flips:
        raise ValueError(f"{d.root} holds no mirrored images: rerun `repa prepare --flip` or set data.hflip=false")
    labels = shards.labels  # a label >= num_classes would silently become the null (CFG) class or crash mid-run
    bad = torch.nonzero((labels < 0) | (labels >= shards.num_classes)).flatten()
    if len(bad):
        i = int(bad[0])
        s = int(torch.searchsorted(shards.offsets[1:], torch.tensor(i), right=True))
        name = shards.manifest["shards"][s]["files"]["latents"]["path"]
        raise ValueError(f"{shards.root / name}: label {int(labels[i])} of item {i - int(shards.offsets[s])} is "
                         f"outside [0, {shards.num_classes}) ({len(bad)} such items in {d.root})")  # fmt: skip
    return shards
