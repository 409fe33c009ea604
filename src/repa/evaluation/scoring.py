"""`score(samples, reference, detector)`: the one scoring entry point (ADM `.npz`, image folder or in-memory batches
against any reference), and the one-line summary `repa eval` prints."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repa.data.sources import source_batches
from repa.evaluation.detectors import Detector
from repa.evaluation.pipeline import compute_activations, score_activations
from repa.evaluation.reference import ReferenceStats, reference_stats
from repa.fileio import write_json


def summary_line(metrics: dict[str, Any]) -> str:
    """One line: FID, sFID, IS, precision, recall, counts and which reference statistics the FID used (n/a for
    unavailable metrics)."""

    def fmt(key: str, spec: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else format(value, spec)

    used = metrics.get("reference_stats")
    if used == "images" and metrics.get("reference_stats_num") is not None:
        used = f"{metrics['reference_stats_num']} images"
    stats = f"; reference statistics: {used}" if used else ""
    return (
        f"FID {fmt('fid', '.3f')}  sFID {fmt('sfid', '.3f')}  IS {fmt('is', '.2f')}  precision {fmt('precision', '.3f')}"
        f"  recall {fmt('recall', '.3f')}  ({metrics.get('num_samples')} samples vs {metrics.get('num_reference')} "
        f"reference, {metrics.get('detector')}{stats})"
    )


def score(
    samples: str | Path | Iterable[np.ndarray | torch.Tensor],
    reference: str | Path | ReferenceStats,
    detector: Detector,
    batch_size: int = 250,
    limit: int | None = None,
    ref_limit: int | None = None,
    resolution: int | None = None,
    out_json: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score samples against a reference, as ADM's evaluator does.

    Args:
        samples: an ADM `.npz`, an image folder, or an iterable of uint8 batches (numpy NHWC / torch NCHW).
        reference: anything `reference_stats` reads, or precomputed ReferenceStats.
        detector: the feature network (its `name` keys the reference cache).
        batch_size: images per detector call when reading files.
        limit, ref_limit: score at most this many samples / reference images.
        resolution: image folders: ADM centre-crop side.
        out_json: optionally write the metrics there.
        progress: tqdm bars.

    Returns:
        The `score_activations` metrics plus `detector`, `samples` and `reference`; also written to `out_json`.
    """
    ref = reference if isinstance(reference, ReferenceStats) else reference_stats(
        reference, detector, batch_size, ref_limit, resolution, progress
    )  # fmt: skip
    if isinstance(samples, (str, Path)):
        batches, total = source_batches(samples, batch_size, limit, resolution)
    else:
        batches, total = samples, None
    metrics: dict[str, Any] = score_activations(compute_activations(detector, batches, total, progress), ref)
    metrics.update(detector=detector.name, samples=str(samples) if isinstance(samples, (str, Path)) else "batches",
                   reference=str(reference) if not isinstance(reference, ReferenceStats) else "stats")  # fmt: skip
    if out_json is not None:
        write_json(metrics, out_json)
    return metrics
