"""Reference statistics: what scoring needs of the real images (Gaussian statistics per feature key, pool features
for precision/recall), from any source: an ADM `.npz` (its precomputed `mu`/`sigma` used as ADM does; cached per
(file content, detector)), a statistics file of `repa eval ref`, an image folder, or `fashion-mnist:<split>`."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repa.assets import cache_dir
from repa.data.npz import image_batches, npz_keys, num_images, read_npz_arrays, save_samples
from repa.data.sources import FASHION_MNIST, fashion_mnist_images, fashion_split, source_batches
from repa.evaluation.detectors import Detector
from repa.evaluation.pipeline import compute_activations


def file_fingerprint(path: str | Path, extra: str = "") -> str:
    """BLAKE2b of a file's bytes plus `extra` (e.g. the detector name): the key of cached statistics."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    h.update(extra.encode())
    return h.hexdigest()


@dataclass
class ReferenceStats:
    """What scoring against a reference needs: Gaussian statistics per feature key and the P/R features.

    Attributes:
        stats: key -> (mu, sigma), keys `pool` and `spatial` (when available).
        pool: (N, D) pool features of the reference images (precision/recall).
        source: "precomputed" (the file's own mu/sigma, as ADM) or "images".
    """

    stats: dict[str, tuple[np.ndarray, np.ndarray]]
    pool: np.ndarray
    source: str

    def save(self, path: str | Path) -> None:
        arrays = {"pool": self.pool, "source": np.array(self.source)}
        for key, (mu, sigma) in self.stats.items():
            arrays[f"mu_{key}"], arrays[f"sigma_{key}"] = mu, sigma
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        with np.load(path, allow_pickle=False) as d:
            keys = [k[3:] for k in d.files if k.startswith("mu_")]
            return cls({k: (d[f"mu_{k}"], d[f"sigma_{k}"]) for k in keys}, d["pool"], str(d["source"]))


def reference_statistics(
    path: str | Path,
    detector: Detector,
    batch_size: int = 250,
    use_precomputed: bool = True,
    cache: bool = True,
    progress: bool = True,
) -> ReferenceStats:
    """Statistics of a reference batch, computed once per (file content, detector) and cached.

    Args:
        path: ADM-layout reference .npz (`arr_0` images; optional `mu`, `sigma`, `mu_s`, `sigma_s`).
        detector: the feature network.
        batch_size: images per detector call.
        use_precomputed: use the file's `mu`/`sigma` (`mu_s`/`sigma_s`) for FID/sFID as ADM does (they come from
            the TF graph over the full dataset); otherwise statistics of the file's images.
        cache: read/write `<cache>/eval/ref-<fingerprint>.npz`.
        progress: tqdm bars.

    Returns:
        ReferenceStats.
    """
    fingerprint = file_fingerprint(path, f"{detector.name}|precomputed={use_precomputed}")
    cached = cache_dir() / "eval" / f"ref-{fingerprint}.npz"
    if cache and cached.is_file():
        return ReferenceStats.load(cached)
    acts = compute_activations(detector, image_batches(path, batch_size), num_images(path), progress)
    stats = {key: (s.mean, s.cov) for key, s in acts.stats.items()}
    source = "images"
    pre = read_npz_arrays(path, ["mu", "sigma", "mu_s", "sigma_s"]) if use_precomputed else {}
    if "mu" in pre and "sigma" in pre:
        stats["pool"] = (pre["mu"], pre["sigma"])
        source = "precomputed"
        if "mu_s" in pre and "sigma_s" in pre:
            stats["spatial"] = (pre["mu_s"], pre["sigma_s"])
    ref = ReferenceStats(stats, acts.pool, source)
    if cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.stem + ".tmp.npz")
        ref.save(tmp)
        tmp.replace(cached)
    return ref


def is_stats_file(path: str | Path) -> bool:
    """True for a statistics file written by `save_reference` (not an image batch)."""
    path = Path(path)
    return path.suffix == ".npz" and path.is_file() and "mu_pool" in npz_keys(path) and "arr_0" not in npz_keys(path)


def save_reference(ref: ReferenceStats, path: str | Path, detector_name: str, source: str = "") -> None:
    """Write reference statistics (the `ReferenceStats.save` arrays) plus the detector's name and the source."""
    buf = io.BytesIO()
    ref.save(buf)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(detector=np.array(detector_name), reference=np.array(str(source)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def load_reference(path: str | Path, detector_name: str | None = None) -> ReferenceStats:
    """Read `save_reference` output; refuse statistics of another detector."""
    with np.load(path, allow_pickle=False) as data:
        stored = str(data["detector"]) if "detector" in data.files else None
    if detector_name is not None and stored is not None and stored != detector_name:
        raise ValueError(f"{path} holds statistics of detector {stored!r}, but scoring uses {detector_name!r}")
    return ReferenceStats.load(path)


def reference_stats(
    source: str | Path,
    detector: Detector,
    batch_size: int = 250,
    limit: int | None = None,
    resolution: int | None = None,
    progress: bool = True,
) -> ReferenceStats:
    """Reference statistics of any source; ADM `.npz` and Fashion-MNIST are cached per (content, detector).

    Args:
        source: statistics file, ADM `.npz` (its precomputed `mu`/`sigma` are used, as ADM does), image folder, or
            `fashion-mnist:<split>`.
        detector: the feature network.
        batch_size: images per detector call.
        limit: use at most this many reference images (see `source_batches`).
        resolution: folders: ADM centre-crop side.
        progress: tqdm bars.
    """
    text = str(source)
    if not text.startswith(FASHION_MNIST) and is_stats_file(text):
        return load_reference(text, detector.name)
    if text.startswith(FASHION_MNIST):  # write the images as an ADM .npz: the statistics cache keys on its content
        split = fashion_split(text)
        path = cache_dir() / "eval" / f"fashion-mnist-{split}-{'all' if limit is None else limit}.npz"
        images, labels = fashion_mnist_images(split, limit)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        save_samples(tmp, images.permute(0, 2, 3, 1).numpy(), labels.numpy())
        tmp.replace(path)
        return reference_statistics(path, detector, batch_size, progress=progress)
    if Path(text).is_file() and limit is None:
        return reference_statistics(text, detector, batch_size, progress=progress)
    batches, total = source_batches(source, batch_size, limit, resolution)
    acts = compute_activations(detector, batches, total, progress)
    return ReferenceStats({k: (s.mean, s.cov) for k, s in acts.stats.items()}, acts.pool, "images")
