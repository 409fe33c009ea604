"""The data `repa probe` and `repa align` feed a model: clean inputs in its space, their labels and the images.

Data follow the checkpoint's own training data: Fashion-MNIST runs read the train split (probe fitting) and the test
split (probe evaluation, alignment), class-balanced first-N subsets, pixels x = image / 127.5 - 1. Other checkpoints
(ImageNet-layout folders, official latent-space SiT/DiT) need `data_root`, an ImageNet-layout image folder: images
are ADM-centre-cropped to the model's resolution and, for latent models, encoded with the SD-VAE (posterior mean x
0.18215).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from repa.data.sources import fashion_mnist_images, folder_images
from repa.data.vae import VAE, from_uint8
from repa.data.vae_spec import load_vae
from repa.loading import LoadedModel


@dataclass
class Inputs:
    """Paired model inputs and images: x (N, C, H, W) in the model's space, labels (N,), uint8 images for encoders."""

    x: Tensor
    labels: Tensor
    images: Tensor

    def subset(self, idx: Tensor) -> Inputs:
        return Inputs(self.x[idx], self.labels[idx], self.images[idx])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _encode(vae: VAE, images: Tensor, batch_size: int, progress: bool) -> Tensor:
    """uint8 images -> scaled VAE posterior means (the latents the model was trained on), on the CPU."""
    chunks = []
    for batch in tqdm(images.split(batch_size), desc="VAE encode", disable=not progress):
        mean, _ = vae.encode_moments(from_uint8(batch))
        chunks.append(vae.normalize(mean).cpu())
    return torch.cat(chunks)


def load_inputs(
    loaded: LoadedModel,
    split: str,
    num: int | None,
    data_root: str | Path | None = None,
    vae: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Inputs:
    """Clean model inputs with their labels and images (see the module docstring for the data rules).

    Args:
        loaded: the model (its config says which data it was trained on).
        split: "train" or "test" (Fashion-MNIST; folders ignore it: pass the folder of that split).
        num: class-balanced first-N subset size (None = all).
        data_root: an ImageNet-layout folder (required for anything but Fashion-MNIST runs).
        vae: SD-VAE hub id or folder for latent models (default: the run's `data.vae`).
        batch_size: VAE batch size.
        progress: tqdm bars.
    """
    cfg, (c, size, _) = loaded.cfg, loaded.sample_shape
    latent = cfg.data.space == "latent"
    root = data_root or (cfg.data.root if loaded.is_repa and cfg.data.kind == "folder" else None)
    if root is None and loaded.is_repa and cfg.data.kind == "fashion-mnist":
        images, labels = fashion_mnist_images(split, num, cfg.data.root)
    elif root is None:
        what = "an ImageNet-layout image folder and the SD-VAE (--vae)" if latent else "an image folder"
        raise ValueError(
            f"this checkpoint was trained on {cfg.data.kind if loaded.is_repa else 'ImageNet latents'}: pass "
            f"--data-root with {what} (one subfolder per class, e.g. ImageNet val) to probe or align it"
        )
    else:
        vae_model = load_vae(loaded.vae(vae), default_device()) if latent else None
        images, labels = folder_images(root, num, size * (vae_model.downsample if vae_model else 1), progress)
        if vae_model is not None:
            return Inputs(_encode(vae_model, images, batch_size, progress), labels, images)
    x = from_uint8(images)
    if tuple(x.shape[1:]) != (c, size, size):
        raise ValueError(f"data of shape {tuple(x.shape[1:])} does not fit the model's input {(c, size, size)}")
    return Inputs(x, labels, images)
