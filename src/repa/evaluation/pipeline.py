"""Score image batches as ADM's evaluator does: detector activations, then FID and sFID against the reference's
statistics, Inception Score of the samples (consecutive chunks of 5,000, as ADM), precision/recall between the
reference images' and the samples' pool features (k = 3). `repa.evaluation.scoring.score` is the entry point from
files."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from repa.evaluation.detectors import Detector
from repa.evaluation.metrics import (
    ADM_IS_SPLIT_SIZE,
    EvaluationInputError,
    FeatureStats,
    check_gaussian,
    frechet_distance,
    inception_score,
    is_num_splits,
    precision_recall,
)

if TYPE_CHECKING:
    from repa.evaluation.reference import ReferenceStats


@dataclass
class Activations:
    """Detector outputs over a set of images: kept per-image features and running statistics.

    Attributes:
        pool: (N, D) float32 pool features (kept for precision/recall).
        logits: (N, C) float32 logits when the detector has a classifier, else None.
        stats: FeatureStats per feature key (`pool`, `spatial`).
        is_missing_reason: why `logits` is None (the detector's `is_missing_reason`), for the metrics JSON.
    """

    pool: np.ndarray
    logits: np.ndarray | None
    stats: dict[str, FeatureStats] = field(default_factory=dict)
    is_missing_reason: str | None = None

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
    detector: Detector,
    batches: Iterable[np.ndarray | torch.Tensor],
    total: int | None = None,
    progress: bool = True,
    desc: str = "features",
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
    bar = tqdm(total=total, unit="img", disable=not progress, desc=desc)
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
    reason = None if logits else getattr(detector, "is_missing_reason", None)
    return Activations(np.concatenate(pools), np.concatenate(logits) if logits else None, stats, reason)


def score_activations(
    acts: Activations, ref: ReferenceStats, is_split_size: int = ADM_IS_SPLIT_SIZE, k: int = 3
) -> dict[str, float | int | str | None]:
    """FID, sFID, IS (mean/std), precision, recall of sample activations against a reference.

    Args:
        acts: sample activations.
        ref: reference statistics.
        is_split_size: Inception Score chunk size (ADM: consecutive chunks of 5,000; see `inception_score`).
        k: neighbourhood size for precision/recall.

    Returns:
        dict with `fid`, `sfid`, `is`, `is_std`, `precision`, `recall`, `num_samples`, `num_reference`; a metric the
        detector cannot provide (sFID without spatial features, IS without a classifier) is None. Also how they were
        computed: `is_split_size` and `is_num_splits` (ADM's chunks), `is_missing_reason` (why IS is None, else None),
        `reference_stats` / `reference_stats_sfid` ("precomputed": the reference file's own mu/sigma, "images":
        statistics of the reference images), `reference_stats_num` (how many images the FID statistics come from;
        None for precomputed ones, whose count the file does not record) and `reference_note` (why a file's
        precomputed statistics were not used, else None).
    """
    out: dict[str, float | int | str | None] = {"num_samples": acts.num, "num_reference": len(ref.pool)}
    for metric, key in (("fid", "pool"), ("sfid", "spatial")):
        if key in acts.stats and key in ref.stats:
            s = acts.stats[key]
            mu, sigma = s.mean, s.cov
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise EvaluationInputError(f"the detector's {key} features of the samples hold NaN/inf values")
            check_gaussian(*ref.stats[key], what=f"reference {key} statistics ({ref.source_of(key)})")
            out[metric] = frechet_distance(mu, sigma, *ref.stats[key])
        else:
            out[metric] = None
    out["is"], out["is_std"] = None, None
    out["is_split_size"], out["is_num_splits"], out["is_missing_reason"] = is_split_size, None, None
    if acts.logits is not None:
        out["is"], out["is_std"] = inception_score(acts.logits, split_size=is_split_size, logits=True)
        out["is_num_splits"] = is_num_splits(len(acts.logits), is_split_size)
        if len(acts.logits) > is_split_size and len(acts.logits) % is_split_size:
            warnings.warn(
                f"Inception Score: {len(acts.logits)} samples are not a multiple of {is_split_size}; as in ADM the "
                f"last chunk of {len(acts.logits) % is_split_size} samples weighs as much as a full one",
                stacklevel=2,
            )
    else:
        out["is_missing_reason"] = acts.is_missing_reason or "the detector gives no classifier logits"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out["precision"], out["recall"] = precision_recall(ref.pool, acts.pool, k=k, device=device)
    out["reference_stats"] = ref.source_of("pool")
    out["reference_stats_sfid"] = ref.source_of("spatial") if out["sfid"] is not None else None
    out["reference_stats_num"] = len(ref.pool) if ref.source_of("pool") == "images" else None
    out["reference_note"] = ref.note
    return out
