"""Score image batches as ADM's evaluator does: detector activations, then FID and sFID against the reference's
statistics, Inception Score of the samples (10 splits), precision/recall between the reference images' and the
samples' pool features (k = 3). `repa.evaluation.scoring.score` is the entry point from files."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from repa.evaluation.detectors import Detector
from repa.evaluation.metrics import FeatureStats, frechet_distance, inception_score, precision_recall

if TYPE_CHECKING:
    from repa.evaluation.reference import ReferenceStats


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
    return Activations(np.concatenate(pools), np.concatenate(logits) if logits else None, stats)


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
