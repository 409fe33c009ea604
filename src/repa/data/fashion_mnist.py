"""Fashion-MNIST (Xiao et al. 2017; 28x28 grayscale, 10 classes, MIT licence) from IDX files, found or downloaded.

Search order for `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`: the `root` argument, `$REPA_DATA/fashion-mnist`,
`/usr/share/datasets/fashion-mnist` (Debian package `dataset-fashion-mnist`), `<repa cache>/data/fashion-mnist`;
if none holds the files, they are downloaded into the cache from the dataset's standard URLs.
"""

from __future__ import annotations

import gzip
import os
import urllib.request
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from repa.assets import cache_dir
from repa.errors import ReportedError
from repa.fileio import atomic_file

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLIT_SIZES = {"train": 60000, "test": 10000}
_PREFIX = {"train": "train", "test": "t10k"}
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class IDXFormatError(ReportedError, ValueError):
    """An IDX file is truncated, has a wrong magic number or an unexpected shape."""

    exit_code = 8


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzip-compressed).

    Args:
        path: the file; `.gz` files are decompressed.
        ndim: expected number of dimensions (3 for images, 1 for labels).

    Returns:
        uint8 array with the file's shape.

    Raises:
        IDXFormatError: wrong magic/type code/ndim, or a size that does not match the header.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise IDXFormatError(f"{path}: cannot read/decompress ({e}); delete the file and retry") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{path}: {len(raw)} bytes is shorter than an IDX header")
    if raw[0:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != ndim:  # 0x08 = unsigned byte
        raise IDXFormatError(
            f"{path}: bad IDX magic {raw[:4].hex()} (expected 000008{ndim:02x}, uint8 with {ndim} dims)"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise IDXFormatError(f"{path}: header says {shape} = {expected} bytes, file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidates(root: str | Path | None) -> list[Path]:
    places = [Path(root)] if root is not None else []
    if os.environ.get("REPA_DATA"):
        places.append(Path(os.environ["REPA_DATA"]) / "fashion-mnist")
    return places + [DEBIAN_DIR, cache_dir() / "data" / "fashion-mnist"]


def _download(stem: str, dest: Path) -> Path:
    errors = []
    for base in MIRRORS:
        try:
            with urllib.request.urlopen(base + stem + ".gz", timeout=30) as r:
                data = r.read()
        except OSError as e:
            errors.append(f"{base}: {e}")
            continue
        out = dest / f"{stem}.gz"
        with atomic_file(out) as f:
            f.write(data)
        return out
    raise OSError("; ".join(errors))


def load_fashion_mnist(
    split: Literal["train", "test"], root: str | Path | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images and labels of one split.

    Args:
        split: "train" (60,000 in the official files) or "test" (10,000).
        root: a folder with the four IDX files (searched first).
        download: fetch into the repa cache when no folder has the files.

    Returns:
        images uint8 (N, 28, 28), labels int64 (N,).

    Raises:
        FileNotFoundError: not found anywhere and not downloadable (the message lists every place tried).
        IDXFormatError: a corrupt file.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stems = [f"{_PREFIX[split]}-images-idx3-ubyte", f"{_PREFIX[split]}-labels-idx1-ubyte"]
    places = _candidates(root)
    paths = None
    for folder in places:
        found = [_find(folder, s) for s in stems]
        if all(found):
            paths = found
            break
    if paths is None:
        dest = places[-1]
        reason = "download disabled"
        if download:
            try:
                paths = [_download(s, dest) for s in stems]
            except OSError as e:
                reason = f"download failed: {e}"
        if paths is None:
            raise FileNotFoundError(
                f"Fashion-MNIST {split} files ({', '.join(s + '[.gz]' for s in stems)}) not found in "
                f"{', '.join(str(p) for p in places)} ({reason}). Install the Debian package "
                "(`apt-get install dataset-fashion-mnist`), set $REPA_DATA to a folder holding fashion-mnist/, "
                "or pass root=FOLDER."
            )
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise IDXFormatError(f"{paths[0].parent}: {split} images {images.shape} do not match labels {labels.shape}")
    if labels.max() >= len(CLASSES):
        raise IDXFormatError(f"{paths[1]}: label {labels.max()} outside [0, {len(CLASSES)})")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
