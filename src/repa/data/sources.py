"""Image sources as uint8 tensors or batches: Fashion-MNIST splits, ImageNet-layout folders, ADM `.npz` batches,
with the one class-balanced first-N subset rule that training, evaluation and analysis share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from repa.data.fashion_mnist import load_fashion_mnist
from repa.data.folder import IMG_EXTENSIONS, center_crop_arr, find_images, load_image, to_rgb
from repa.data.npz import image_batches, num_images

FASHION_MNIST = "fashion-mnist:"


def balanced_subset(labels: torch.Tensor, num: int | None, num_classes: int) -> torch.Tensor:
    """Indices of the first `num // num_classes` items of each class, in dataset order (all if num is None)."""
    if num is None or num >= len(labels):
        return torch.arange(len(labels))
    per_class = num // num_classes
    if per_class < 1:
        raise ValueError(f"data.num_train={num} is smaller than the number of classes ({num_classes})")
    picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)]
    return torch.sort(torch.cat(picks)).values


def check_labels(labels: torch.Tensor, num_classes: int, name: str) -> None:
    """Raise ValueError naming the first label outside [0, num_classes) (the null class is num_classes)."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(torch.nonzero((labels < 0) | (labels >= num_classes))[0])
        raise ValueError(f"{name}: label {int(labels[bad])} of item {bad} is outside [0, {num_classes})")


def fashion_split(source: str) -> str:
    split = source[len(FASHION_MNIST) :]
    if split not in ("train", "test"):
        raise ValueError(f"{source!r}: use fashion-mnist:train or fashion-mnist:test")
    return split


def fashion_mnist_images(
    split: str, limit: int | None = None, root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST uint8 (N, 1, 28, 28) and labels; with `limit`, the first limit // 10 items of each class.

    `root` is searched first (then the places `repa.data.fashion_mnist` knows)."""
    images, labels = load_fashion_mnist(split, root=root)  # type: ignore[arg-type]
    keep = balanced_subset(labels, limit, 10)
    return images[keep][:, None].contiguous(), labels[keep]


def _folder_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
    return files


def _folder_batches(files: list[Path], batch_size: int, resolution: int | None) -> Iterator[np.ndarray]:
    size = None
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            with Image.open(path) as img:
                rgb = to_rgb(img)
                arr = center_crop_arr(rgb, resolution) if resolution else np.asarray(rgb)
            if size is None:
                size = arr.shape
            elif arr.shape != size:
                raise ValueError(f"{path} is {arr.shape[:2]}, the first image {size[:2]}: pass a resolution to crop")
            batch.append(arr)
        yield np.stack(batch)


def source_batches(
    source: str | Path, batch_size: int = 250, limit: int | None = None, resolution: int | None = None
) -> tuple[Iterator[np.ndarray | torch.Tensor], int]:
    """uint8 image batches (numpy NHWC or torch NCHW) of a source, and how many images they hold.

    Args:
        source: ADM `.npz`, image folder, or `fashion-mnist:train|test`.
        batch_size: images per batch.
        limit: at most this many images (Fashion-MNIST: a class-balanced first-N subset; others: the first N).
        resolution: folders only: ADM centre crop to this side (None: images used as they are).
    """
    text = str(source)
    if text.startswith(FASHION_MNIST):
        images, _ = fashion_mnist_images(fashion_split(text), limit)
        return iter(images.split(batch_size)), len(images)
    path = Path(source)
    if path.is_dir():
        files = _folder_files(path)[:limit]
        return _folder_batches(files, batch_size, resolution), len(files)
    if not path.is_file():
        raise FileNotFoundError(f"{source} is neither a file, a folder, nor fashion-mnist:<split>")
    total = num_images(path) if limit is None else min(limit, num_images(path))
    return image_batches(path, batch_size, limit), total


def folder_images(
    root: str | Path, num: int | None, resolution: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced first-N images of an ImageNet-layout folder (ADM centre crop), loading only those."""
    samples, classes = find_images(root)
    labels = torch.tensor([c for _, c in samples])
    keep = balanced_subset(labels, num, len(classes)).tolist()
    images = [load_image(samples[i][0], resolution) for i in tqdm(keep, desc=f"images {root}", disable=not progress)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels[keep]


def check_source(source: str | Path) -> None:
    """Fail early (before any sampling) when a source does not exist."""
    text = str(source)
    if text.startswith(FASHION_MNIST):
        fashion_split(text)
    elif not Path(text).exists():
        raise FileNotFoundError(f"reference {text} does not exist (an .npz, a folder, or fashion-mnist:<split>)")
