"""Sample-quality evaluation: FID Inception detector, FID/sFID/IS/precision/recall, ADM .npz batches, label sampling."""

from repa.evaluation.detectors import (
    INCEPTION_SHA1,
    Detector,
    EncoderDetector,
    InceptionDetector,
    inception_classifier,
    inception_path,
    tf_bilinear_resize,
)
from repa.evaluation.metrics import (
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)
from repa.evaluation.npz import image_batches, npz_keys, num_images, open_npz_array, read_npz_arrays, save_samples
from repa.evaluation.pipeline import (
    Activations,
    ReferenceStats,
    compute_activations,
    evaluate,
    reference_statistics,
    score_activations,
)
from repa.evaluation.sampling import balanced_labels, rank_slice

__all__ = [
    "INCEPTION_SHA1",
    "Activations",
    "Detector",
    "EncoderDetector",
    "FeatureStats",
    "InceptionDetector",
    "ReferenceStats",
    "balanced_labels",
    "compute_activations",
    "evaluate",
    "fid_from_stats",
    "frechet_distance",
    "image_batches",
    "inception_classifier",
    "inception_path",
    "inception_score",
    "manifold_radii",
    "npz_keys",
    "num_images",
    "open_npz_array",
    "precision_recall",
    "rank_slice",
    "read_npz_arrays",
    "reference_statistics",
    "save_samples",
    "score_activations",
    "tf_bilinear_resize",
]
