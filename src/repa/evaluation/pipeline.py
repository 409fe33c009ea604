"""Score image batches: detector activations, cached reference statistics, and FID/sFID/IS/precision/recall.

`evaluate(samples, reference, detector)` is what `repa eval` needs; it mirrors ADM's evaluator: FID and sFID
against the reference's precomputed `mu`/`sigma`/`mu_s`/`sigma_s` when present (else statistics of its images),
Inception Score of the samples (10 splits), precision/recall between the reference images' and the samples' pool
features (k = 3).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from repa.evaluation.detectors import Detector, cache_dir
from repa.evaluation.metrics import FeatureStats, frechet_distance, inception_score, precision_recall
from repa.evaluation.npz import image_batches, num_images, read_npz_arrays


@dataclass
class Activations:
    """Detector outputs over a set of images: kept per-image features and running statistics.

    Attributes:
        pool: (N, D) float32 pool features (kept for precision/recall).
        logits: (N, C) float32 logits when the detector has a classifier, else None.
        stats: FeatureStats per feature key (`pool`, `spatial`).
    """

    pool: np.ndarray
    logits: np.ndarray | None
    stats: dict[str, FeatureStats] = field(default_factory=dict)

    @property
    def num(self) -> int:
        return len(self.pool)


def to_nchw_uint8(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """numpy NHWC (ADM layout) or torch NCHW uint8 images -> torch uint8 (B, 3, H, W); grayscale is repeated."""
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (NHWC numpy / NCHW torch), got {batch.dtype} {tuple(batch.shape)}")
    return batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch


@torch.no_grad()
def compute_activations(
    detector: Detector, batches: Iterable[np.ndarray | torch.Tensor], total: int | None = None, progress: bool = True
) -> Activations:
    """Run the detector over image batches, keeping pool features/logits and accumulating statistics.

    Args:
        detector: e.g. `InceptionDetector()`.
        batches: uint8 image batches, numpy NHWC or torch NCHW.
        total: number of images, for the progress bar.
        progress: show a tqdm bar.

    Returns:
        Activations (statistics for every 2-D output except logits).
    """
    pools, logits, stats = [], [], {}
    bar = tqdm(total=total, unit="img", disable=not progress, desc="features")
    for batch in batches:
        feats = detector.features(to_nchw_uint8(batch))
        for key, value in feats.items():
            if key == "logits":
                logits.append(value.float().cpu().numpy())
                continue
            stats.setdefault(key, FeatureStats(value.shape[1])).update(value)
            if key == "pool":
                pools.append(value.float().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    if not pools:
        raise ValueError("no images to compute activations on")
    return Activations(np.concatenate(pools), np.concatenate(logits) if logits else None, stats)


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


def score_activations(
    acts: Activations, ref: ReferenceStats, num_is_splits: int = 10, k: int = 3
) -> dict[str, float | int | None]:
    """FID, sFID, IS (mean/std), precision, recall of sample activations against a reference.

    Args:
        acts: sample activations.
        ref: reference statistics.
        num_is_splits: Inception Score splits.
        k: neighbourhood size for precision/recall.

    Returns:
        dict with `fid`, `sfid`, `is`, `is_std`, `precision`, `recall`, `num_samples`, `num_reference`; a metric the
        detector cannot provide (sFID without spatial features, IS without a classifier) is None.
    """
    out: dict[str, float | int | None] = {"num_samples": acts.num, "num_reference": len(ref.pool)}
    for metric, key in (("fid", "pool"), ("sfid", "spatial")):
        if key in acts.stats and key in ref.stats:
            s = acts.stats[key]
            out[metric] = frechet_distance(s.mean, s.cov, *ref.stats[key])
        else:
            out[metric] = None
    if acts.logits is not None and acts.num >= num_is_splits:
        out["is"], out["is_std"] = inception_score(acts.logits, num_is_splits, logits=True)
    else:
        out["is"], out["is_std"] = None, None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out["precision"], out["recall"] = precision_recall(ref.pool, acts.pool, k=k, device=device)
    return out


def evaluate(
    samples: str | Path | Iterable[np.ndarray | torch.Tensor],
    reference: str | Path | ReferenceStats,
    detector: Detector,
    batch_size: int = 250,
    progress: bool = True,
    out_json: str | Path | None = None,
) -> dict[str, float | int | None]:
    """Score samples against a reference, as ADM's evaluator does.

    Args:
        samples: an ADM-layout sample .npz, or an iterable of uint8 batches (numpy NHWC / torch NCHW).
        reference: an ADM-layout reference .npz (statistics cached) or precomputed ReferenceStats.
        detector: the feature network (its `name` keys the cache).
        batch_size: images per detector call when reading files.
        progress: tqdm bars.
        out_json: optionally write the metrics there.

    Returns:
        The metrics dict of `score_activations`, plus `detector`.
    """
    ref = (
        reference
        if isinstance(reference, ReferenceStats)
        else reference_statistics(reference, detector, batch_size, progress=progress)
    )
    if isinstance(samples, (str, Path)):
        acts = compute_activations(detector, image_batches(samples, batch_size), num_images(samples), progress)
    else:
        acts = compute_activations(detector, samples, None, progress)
    metrics = score_activations(acts, ref)
    metrics["detector"] = detector.name  # type: ignore[assignment]
    if out_json is not None:
        Path(out_json).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
