"""Reference statistics: what scoring needs of the real images (Gaussian statistics per feature key, pool features
for precision/recall), from any source: an ADM `.npz` (its precomputed `mu`/`sigma` used as ADM does when they
belong to the detector; cached per (file content, detector)), a statistics file of `repa eval ref`, an image folder,
or `fashion-mnist:<split>`.

Which statistics a score used is recorded: `ReferenceStats.source_of(key)` is "precomputed" (the file's own
`mu`/`sigma`, resp. `mu_s`/`sigma_s`) or "images" (statistics of the reference images), and `note` says why a file's
precomputed statistics were not used. ADM's reference batches hold pool_3 (2048-d) and `mixed_6/conv[..., :7]`
(2023-d) statistics of the 2015 Inception graph with TensorFlow's resize, so they are used only with the detector
that reproduces it (`inception-2015-12-05/tf`, see `ADM_STATISTICS_DETECTOR`) and only with matching dimensions.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from repa.assets import cache_dir, update_digest
from repa.data.npz import image_batches, npz_keys, num_images, read_npz_arrays, save_samples
from repa.data.sources import FASHION_MNIST, fashion_mnist_images, fashion_split, source_batches
from repa.evaluation.detectors import Detector
from repa.evaluation.metrics import EvaluationInputError, check_gaussian
from repa.evaluation.pipeline import compute_activations
from repa.fileio import atomic_file
from repa.generate import to_adm_nhwc

# The detector whose features ADM's precomputed `mu`/`sigma` (pool_3) and `mu_s`/`sigma_s` describe: the 2015 TF
# Inception graph fed through TensorFlow's legacy bilinear resize (`InceptionDetector(resize="tf")`); a
# user-supplied archive of it is named `inception-2015-12-05/tf/<file name>` and counts too.
ADM_STATISTICS_DETECTOR = "inception-2015-12-05/tf"
PRECOMPUTED_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
_CACHE_VERSION = "v2"  # v1 caches could hold precomputed Inception statistics keyed to another detector


def uses_adm_statistics(detector_name: str) -> bool:
    """Whether precomputed ADM reference statistics belong to the detector of this name."""
    return detector_name == ADM_STATISTICS_DETECTOR or detector_name.startswith(ADM_STATISTICS_DETECTOR + "/")


def file_fingerprint(path: str | Path, extra: str = "") -> str:
    """BLAKE2b of a file's bytes plus `extra` (e.g. the detector name): the key of cached statistics."""
    h = hashlib.blake2b(digest_size=16)
    update_digest(h, path, 1 << 24)
    h.update(extra.encode())
    return h.hexdigest()


@dataclass
class ReferenceStats:
    """What scoring against a reference needs: Gaussian statistics per feature key and the P/R features.

    Attributes:
        stats: key -> (mu, sigma), keys `pool` and `spatial` (when available).
        pool: (N, D) pool features of the reference images (precision/recall).
        source: where the `pool` (FID) statistics come from: "precomputed" (the file's own mu/sigma, as ADM) or
            "images".
        sources: the same per key (a key missing here has `source`); see `source_of`.
        note: why precomputed statistics in the reference file were not used (None when there is nothing to say).
        detector: the detector the file says its statistics belong to (`save_reference`; None when it does not).
    """

    stats: dict[str, tuple[np.ndarray, np.ndarray]]
    pool: np.ndarray
    source: str
    sources: dict[str, str] = field(default_factory=dict)
    note: str | None = None
    detector: str | None = None

    def source_of(self, key: str) -> str:
        """Where the statistics of `key` come from: "precomputed" or "images"."""
        return self.sources.get(key, self.source)

    def save(self, path: str | Path | BinaryIO, **extra: np.ndarray) -> None:
        """An `.npz` of the statistics, pool features, sources and note (plus `extra` arrays); no pickle."""
        arrays = {"pool": self.pool, "source": np.array(self.source)}
        for key, (mu, sigma) in self.stats.items():
            arrays[f"mu_{key}"], arrays[f"sigma_{key}"] = mu, sigma
            arrays[f"source_{key}"] = np.array(self.source_of(key))
        if self.note:
            arrays["note"] = np.array(self.note)
        np.savez(path, **arrays, **extra)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        """Read `save` output; EvaluationInputError naming the file when it is damaged (NaN/inf, wrong shapes)."""
        try:
            with np.load(path, allow_pickle=False) as d:
                keys = [k[3:] for k in d.files if k.startswith("mu_")]
                stats = {k: (d[f"mu_{k}"], d[f"sigma_{k}"]) for k in keys}
                sources = {k: str(d[f"source_{k}"]) for k in keys if f"source_{k}" in d.files}
                text = {k: str(d[k]) if k in d.files else None for k in ("note", "detector")}
                ref = cls(stats, d["pool"], str(d["source"]), sources, **text)
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            if isinstance(err, (FileNotFoundError, PermissionError)):
                raise
            raise EvaluationInputError(
                f"{path}: not readable as reference statistics ({type(err).__name__}: {err})"
            ) from err
        for key, (mu, sigma) in ref.stats.items():
            check_gaussian(mu, sigma, f"{path}: {key} statistics (mu_{key}/sigma_{key})")
        if ref.pool.ndim != 2 or not np.isfinite(ref.pool).all():
            raise EvaluationInputError(f"{path}: the reference pool features are not a finite (N, D) array")
        if "pool" in ref.stats and ref.pool.shape[1] != len(ref.stats["pool"][0]):
            raise EvaluationInputError(
                f"{path}: pool features are {ref.pool.shape[1]}-d but the pool statistics {len(ref.stats['pool'][0])}-d"
            )
        return ref


def _adopt_precomputed(
    path: str | Path,
    detector_name: str,
    stats: dict[str, tuple[np.ndarray, np.ndarray]],
    sources: dict[str, str],
) -> list[str]:
    """Replace image statistics by the file's precomputed ones where they belong to the detector; return notes on
    those left unused. Damaged precomputed statistics that would be used raise EvaluationInputError."""
    pre = read_npz_arrays(path, [name for pair in PRECOMPUTED_KEYS.values() for name in pair])
    if not pre:
        return []
    if not uses_adm_statistics(detector_name):
        return [
            f"{path}: precomputed {'/'.join(pre)} not used: they are statistics of ADM's Inception "
            f"({ADM_STATISTICS_DETECTOR}), not of detector {detector_name!r}; statistics of the file's images are "
            "used instead"
        ]
    notes = []
    for key, (mu_name, sigma_name) in PRECOMPUTED_KEYS.items():
        present = [name for name in (mu_name, sigma_name) if name in pre]
        if not present:
            continue
        what = f"{path}: precomputed {mu_name}/{sigma_name}"
        if len(present) == 1:
            raise EvaluationInputError(f"{what}: the file has {present[0]!r} but not its pair; it is damaged")
        mu, sigma = pre[mu_name], pre[sigma_name]
        if key not in stats:
            notes.append(f"{what} not used: the detector gives no {key} features")
            continue
        dim = len(stats[key][0])
        if mu.ndim != 1 or sigma.ndim != 2 or mu.shape[0] != dim:
            notes.append(
                f"{what} not used: shapes {mu.shape}/{sigma.shape} do not match the detector's {dim}-d {key} "
                "features; statistics of the file's images are used instead"
            )
            continue
        check_gaussian(mu, sigma, what)
        stats[key] = (mu, sigma)
        sources[key] = "precomputed"
    return notes


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
            the TF graph over the full dataset) when they belong to the detector: only for `ADM_STATISTICS_DETECTOR`
            and with the detector's dimensions (otherwise statistics of the file's images, with a warning and a
            `note`). False: always statistics of the file's images.
        cache: read/write `<cache>/eval/ref-<fingerprint>.npz` (a damaged cache file is recomputed).
        progress: tqdm bars.

    Returns:
        ReferenceStats.

    Raises:
        NpzError: the file is not a readable ADM batch (names it).
        EvaluationInputError: precomputed statistics that would be used hold NaN/inf or are incomplete.
    """
    fingerprint = file_fingerprint(path, f"{detector.name}|precomputed={use_precomputed}|{_CACHE_VERSION}")
    cached = cache_dir() / "eval" / f"ref-{fingerprint}.npz"
    if cache and cached.is_file():
        try:
            ref = ReferenceStats.load(cached)
        except EvaluationInputError as err:
            warnings.warn(f"damaged cached reference statistics ({err}); recomputing them", stacklevel=2)
        else:
            if ref.note:
                warnings.warn(ref.note, stacklevel=2)
            return ref
    acts = compute_activations(detector, image_batches(path, batch_size), num_images(path), progress)
    stats = {key: (s.mean, s.cov) for key, s in acts.stats.items()}
    sources = {key: "images" for key in stats}
    notes = _adopt_precomputed(path, detector.name, stats, sources) if use_precomputed else []
    note = "; ".join(notes) or None
    if note:
        warnings.warn(note, stacklevel=2)
    ref = ReferenceStats(stats, acts.pool, sources.get("pool", "images"), sources, note)
    if cache:
        with atomic_file(cached, suffix=".npz") as f:
            ref.save(f)
    return ref


def is_stats_file(path: str | Path) -> bool:
    """True for a statistics file written by `save_reference` (not an image batch); NpzError for a damaged .npz."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    keys = npz_keys(path)
    return "mu_pool" in keys and "arr_0" not in keys


def save_reference(ref: ReferenceStats, path: str | Path, detector_name: str, source: str = "") -> None:
    """Write reference statistics (the `ReferenceStats.save` arrays) plus the detector's name and the source."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ref.save(path, detector=np.array(detector_name), reference=np.array(str(source)))


def load_reference(path: str | Path, detector_name: str | None = None) -> ReferenceStats:
    """Read `save_reference` output, checked (finite, consistent shapes).

    With `detector_name`, refuse statistics of another detector and files that do not name their detector (they
    could belong to any network, and a wrong one gives a meaningless FID). EvaluationInputError names the file.
    """
    ref = ReferenceStats.load(path)
    stored = ref.detector
    if detector_name is not None and stored is None:
        raise EvaluationInputError(
            f"{path} does not say which detector its statistics belong to (no 'detector' entry), so it cannot be "
            f"checked against {detector_name!r}; recompute it with `repa eval ref <source> --out {path}`"
        )
    if detector_name is not None and stored != detector_name:
        raise EvaluationInputError(
            f"{path} holds statistics of detector {stored!r}, but scoring uses {detector_name!r}"
        )
    return ref


def reference_stats(
    source: str | Path,
    detector: Detector,
    batch_size: int = 250,
    limit: int | None = None,
    resolution: int | None = None,
    progress: bool = True,
    data_root: str | Path | None = None,
) -> ReferenceStats:
    """Reference statistics of any source; ADM `.npz` and Fashion-MNIST are cached per (content, detector).

    Args:
        source: statistics file, ADM `.npz` (its precomputed `mu`/`sigma` are used as ADM does when they belong to
            the detector, see `reference_statistics`), image folder, or `fashion-mnist:<split>`.
        detector: the feature network.
        batch_size: images per detector call.
        limit: use at most this many reference images (see `source_batches`). With an ADM `.npz` the statistics
            are then those of its first `limit` images, never the file's precomputed ones (`note` says so).
        resolution: folders: ADM centre-crop side.
        progress: tqdm bars.
        data_root: Fashion-MNIST: the IDX folder searched first (then the places `repa.data.fashion_mnist` knows).
    """
    text = str(source)
    if not text.startswith(FASHION_MNIST) and is_stats_file(text):
        return load_reference(text, detector.name)
    if text.startswith(FASHION_MNIST):  # written as an ADM .npz (RGB, as samples are): the cache keys on its content
        split = fashion_split(text)
        path = cache_dir() / "eval" / f"fashion-mnist-{split}-{'all' if limit is None else limit}.npz"
        images, labels = fashion_mnist_images(split, limit, data_root)
        save_samples(path, to_adm_nhwc(images), labels.numpy())
        return reference_statistics(path, detector, batch_size, use_precomputed=False, progress=progress)
    if Path(text).is_file() and limit is None:
        return reference_statistics(text, detector, batch_size, progress=progress)
    note = None
    if Path(text).is_file():
        unused = [name for name in ("mu", "sigma", "mu_s", "sigma_s") if name in npz_keys(text)]
        if unused:
            note = (
                f"{text}: precomputed {'/'.join(unused)} not used: the reference is limited to its first {limit} "
                "images (--ref-num / ref_limit), whose statistics are used instead"
            )
            warnings.warn(note, stacklevel=2)
    batches, total = source_batches(source, batch_size, limit, resolution)
    acts = compute_activations(detector, batches, total, progress)
    stats = {k: (s.mean, s.cov) for k, s in acts.stats.items()}
    return ReferenceStats(stats, acts.pool, "images", {k: "images" for k in stats}, note)
