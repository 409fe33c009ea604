"""ImageNet-layout image folders (one subfolder per class) with the ADM centre crop, as a Dataset or in memory.

Colour handling (documented choice, as the official REPA/ADM pipelines do with `convert("RGB")`): grayscale ("L",
"1") is replicated to RGB; 16-bit grayscale (and 32-bit integer "I" images within [0, 65535]) is scaled to 8 bits
(>> 8) first; palette images go through RGBA; CMYK uses PIL's conversion; alpha channels are DROPPED (not
composited), matching the official preprocessing. Float ("F") and LAB images are refused (no known range / no
colour conversion in PIL) rather than silently turned black or miscoloured.
Unreadable files (zero bytes, truncated, not an image) raise `CorruptImageError` naming the file, or are skipped and
counted with `on_error="skip"`. So do entries that are named like images but are no regular file: broken symbolic
links, FIFOs, sockets, devices and directories such as `x.png/` (`find_images` lists them, `load_image` refuses them
from `stat` alone, so a FIFO is never opened and nothing blocks on it).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from repa.errors import ReportedError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
OnError = Literal["raise", "skip"]


class CorruptImageError(ReportedError, ValueError):
    """An image file could not be decoded; `path` names it."""

    exit_code = 7

    def __init__(self, path: str | Path, cause: BaseException | str) -> None:
        super().__init__(f"corrupt or unreadable image {path}: {cause}")
        self.path = Path(path)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM centre crop (Dhariwal & Nichol 2021): halve with a BOX filter while the short side is >= 2 * image_size,
    BICUBIC-resize so the short side equals image_size, then crop the centre square.

    Args:
        pil_image: any-size image (RGB for the usual (H, W, 3) output).
        image_size: output side.

    Returns:
        uint8 array (image_size, image_size[, C]).
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (see the module docstring for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("F", "LAB"):  # float pixels have no known range; PIL's LAB -> RGB is not a colour conversion
        raise ValueError(f"unsupported image mode {img.mode!r}: convert it to an 8- or 16-bit RGB/grayscale file")
    if img.mode == "I":  # 32-bit integers (16-bit grayscale PNGs on older Pillow): PIL would clip them at 255
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"32-bit integer pixels span {arr.min()}..{arr.max()}, outside the 16-bit range")
        img = Image.fromarray(arr.astype(np.uint16))  # then the 16-bit rule below
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))  # 16 -> 8 bits, "L"
    elif img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB")


def _not_a_file(path: Path) -> str | None:
    """Why `path` is no regular file (following symbolic links), or None if it is one; never opens it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
        return "file does not exist (removed while listing?)"
    except OSError as e:  # a symbolic-link loop, a permission error on the way
        return f"cannot stat it: {type(e).__name__}: {e}"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}  # fmt: skip
    kind = next((name for test, name in kinds.items() if test(mode)), f"a special file (mode {oct(mode)})")
    return f"not a regular file: it is {kind}{' (via a symbolic link)' if path.is_symlink() else ''}"


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode, convert to RGB and ADM-centre-crop one file -> uint8 (image_size, image_size, 3).

    Raises:
        CorruptImageError: empty, truncated or undecodable file; or no regular file at all (broken symbolic link,
            FIFO, directory, ...), refused before it is opened.
    """
    path = Path(path)
    if (why := _not_a_file(path)) is not None:
        raise CorruptImageError(path, why)
    try:
        if path.stat().st_size == 0:
            raise CorruptImageError(path, "file is empty (0 bytes)")
        with Image.open(path) as img:
            img.load()  # decodes fully: truncated files raise here
            return center_crop_arr(to_rgb(img), image_size)
    except CorruptImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(path, f"{type(e).__name__}: {e}") from e


def find_images(
    root: str | Path, extensions: tuple[str, ...] = IMG_EXTENSIONS
) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, class index) for every entry named like an image under `root/<class>/**` (sorted), classes sorted by
    folder name. Entries that are no regular file (broken symbolic links, FIFOs, directories named `x.png`, ...) are
    listed too, so that reading them fails (or is skipped and counted) like a corrupt file instead of vanishing
    silently; the contents of such a directory are listed as usual."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root} has no class subfolders (expected ImageNet layout root/<class>/<image>)")
    samples = [
        (p, c)
        for c, name in enumerate(classes)
        for p in sorted((root / name).rglob("*"))
        if p.suffix.lower() in extensions
    ]
    if not samples:
        raise FileNotFoundError(f"no images with extensions {extensions} under {root}")
    return samples, classes


class ImageFolder(torch.utils.data.Dataset):
    """Items dict(image=uint8 (3, R, R), y=long, index=int) of an ImageNet-layout folder (training draws flips
    itself: `repa.training.batches.GlobalOrder`).

    With `on_error="skip"`, a corrupt file yields None (drop it with `skip_none_collate`) and is counted in
    `num_skipped` / `skipped` (per process: each DataLoader worker keeps its own count).
    """

    def __init__(self, root: str | Path, resolution: int, *, on_error: OnError = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.samples, self.classes = find_images(root)
        self.resolution, self.on_error = resolution, on_error
        self.skipped: list[Path] = []

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        path, label = self.samples[index]
        try:
            arr = load_image(path, self.resolution)
        except CorruptImageError:
            if self.on_error == "raise":
                raise
            self.skipped.append(path)
            return None
        image = torch.from_numpy(np.array(arr)).permute(2, 0, 1)  # (3, R, R); copies the read-only crop
        return {"image": image, "y": torch.tensor(label), "index": index}


def skip_none_collate(items: list[dict | None]) -> dict:
    """Default collation after dropping the None items of skipped files."""
    return torch.utils.data.default_collate([it for it in items if it is not None])


def load_image_folder(
    root: str | Path, resolution: int, *, on_error: OnError = "raise", progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a whole (small) folder into memory with the ADM centre crop.

    Args:
        root: ImageNet-layout folder.
        resolution: output side.
        on_error: "raise" (default) or "skip" corrupt files (their number is printed).
        progress: tqdm bar.

    Returns:
        images uint8 (N, 3, R, R), labels int64 (N,), class names (folder names, sorted).
    """
    ds = ImageFolder(root, resolution, on_error=on_error)
    items = [ds[i] for i in tqdm(range(len(ds)), desc=f"decoding {root}", disable=not progress)]
    items = [it for it in items if it is not None]
    if ds.num_skipped:
        print(f"[repa] skipped {ds.num_skipped} corrupt images in {root}, e.g. {ds.skipped[0]}")
    if not items:
        raise ValueError(f"no readable images in {root}")
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["y"] for it in items]).long()
    return images, labels, ds.classes
