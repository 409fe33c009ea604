"""Map-style datasets for the training loop: in-memory pixels (+ cached targets) and VAE-latent shards.

Every random draw (horizontal flip, posterior sample) is a pure function of (seed, epoch, index), so an item is the
same in any worker, process or resumed run; call `set_epoch` at each epoch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from repa.data.features import TargetCache

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed for one item's random draws."""
    h = _splitmix64(seed & _MASK64)
    for v in (epoch, index, stream):
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


def flip_coin(seed: int, epoch: int, index: int) -> bool:
    """Fair, deterministic coin: mirror item `index` in `epoch`?"""
    return bool(item_seed(seed, epoch, index, 1) & 1)


def _images_nchw(images: torch.Tensor | np.ndarray, channels_last: bool | None) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        return images[:, None]
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C) / (N, C, H, W), got {tuple(images.shape)}")
    if channels_last is None:  # (N, H, W, C) per the contract; also take (N, C, H, W) when unambiguous
        channels_last = not (images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3))
    return images.permute(0, 3, 1, 2).contiguous() if channels_last else images


class PixelDataset(torch.utils.data.Dataset):
    """Items dict(x=float (C, H', W') in [-1, 1], y=long, index=int, flip=bool[, target=(N, D) float32]).

    Args:
        images: uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) (`channels_last` decides when ambiguous).
        labels: (N,) class indices.
        targets: a TargetCache of these images in this order (built with flips (False, True) when hflip).
        pad_to: pad x symmetrically to this side with -1 (black), e.g. 28 -> 32; targets are unaffected.
        hflip: mirror each item with probability 1/2 (decided by (seed, epoch, index)).
        seed: data seed.
        channels_last: layout of 4-D `images` (None: detect).
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        targets: TargetCache | None = None,
        pad_to: int | None = None,
        hflip: bool = False,
        seed: int = 0,
        channels_last: bool | None = None,
    ) -> None:
        self.images = _images_nchw(images, channels_last)
        self.labels = torch.as_tensor(labels).long()
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if targets is not None:
            if len(targets) != len(self.images):
                raise ValueError(f"target cache has {len(targets)} images, dataset {len(self.images)}")
            if hflip and len(targets.flips) < 2:
                raise ValueError(
                    "hflip=True needs targets of mirrored images: build the cache with flips=(False, True)"
                )
        h, w = self.images.shape[-2:]
        if pad_to is not None and pad_to < max(h, w):
            raise ValueError(f"pad_to={pad_to} is smaller than the images ({h}x{w})")
        self.targets, self.pad_to, self.hflip, self.seed = targets, pad_to, hflip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        flip = self.hflip and flip_coin(self.seed, self.epoch, index)
        img = self.images[index]
        if flip:
            img = img.flip(-1)
        x = img.float() / 127.5 - 1.0
        if self.pad_to is not None:
            h, w = x.shape[-2:]
            top, left = (self.pad_to - h) // 2, (self.pad_to - w) // 2
            x = torch.nn.functional.pad(x, (left, self.pad_to - w - left, top, self.pad_to - h - top), value=-1.0)
        item = {"x": x, "y": self.labels[index], "index": index, "flip": flip}
        if self.targets is not None:
            item["target"] = self.targets.get(index, flip)
        return item


def save_latent_shard(
    path: str | Path, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, metadata: dict | None = None
) -> None:
    """Write one shard of VAE posterior moments (N, C, h, w) and labels (N,) as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {"mean": mean.float().contiguous(), "std": std.float().contiguous(), "labels": labels.long().contiguous()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


class LatentDataset(torch.utils.data.Dataset):
    """Items dict(x=(mean + std * eps) * scale, y, index[, target]) with a fresh eps per (seed, epoch, index).

    Args:
        mean, std: posterior moments (N, C, h, w).
        labels: (N,).
        targets: optional TargetCache of the same images (unflipped).
        seed: data seed.
        scale: latent scale (default `repa.data.vae.LATENT_SCALE`).
    """

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        labels: torch.Tensor,
        targets: TargetCache | None = None,
        seed: int = 0,
        scale: float | None = None,
    ) -> None:
        from repa.data.vae import LATENT_SCALE

        if mean.shape != std.shape or len(mean) != len(labels):
            raise ValueError(f"mean {tuple(mean.shape)}, std {tuple(std.shape)} and labels {len(labels)} disagree")
        if targets is not None and len(targets) != len(mean):
            raise ValueError(f"target cache has {len(targets)} images, latents {len(mean)}")
        self.mean, self.std, self.labels, self.targets = mean, std, torch.as_tensor(labels).long(), targets
        self.seed, self.scale, self.epoch = seed, LATENT_SCALE if scale is None else scale, 0

    @classmethod
    def from_shards(cls, paths: list[str | Path] | str | Path, **kwargs) -> LatentDataset:
        """Concatenate shards written by `save_latent_shard` (a folder means its *.safetensors, sorted)."""
        from safetensors.torch import load_file

        if isinstance(paths, (str, Path)) and Path(paths).is_dir():
            paths = sorted(Path(paths).glob("*.safetensors"))
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise FileNotFoundError("no latent shards given")
        shards = [load_file(str(p)) for p in paths]
        cat = {k: torch.cat([s[k] for s in shards]) for k in ("mean", "std", "labels")}
        return cls(cat["mean"], cat["std"], cat["labels"], **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, index: int) -> dict:
        from repa.data.vae import sample_latents

        g = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index, 2))
        item = {"x": sample_latents(self.mean[index], self.std[index], g, self.scale), "y": self.labels[index],
                "index": index}  # fmt: skip
        if self.targets is not None:
            item["target"] = self.targets.get(index)
        return item
