"""Sample-quality evaluation: FID Inception detector, FID/sFID/IS/precision/recall, ADM .npz batches, label sampling."""

from repa.data.npz import NpzError, image_batches, npz_keys, num_images, open_npz_array, read_npz_arrays, save_samples
from repa.evaluation.detectors import Detector, EncoderDetector, make_detector
from repa.evaluation.inception import InceptionDetector, tf_bilinear_resize
from repa.evaluation.inception_weights import (
    INCEPTION_SHA1,
    classifier_search_paths,
    find_inception_classifier,
    inception_classifier,
    inception_path,
)
from repa.evaluation.metrics import (
    ADM_IS_SPLIT_SIZE,
    EvaluationInputError,
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)
from repa.evaluation.pipeline import Activations, compute_activations, score_activations
from repa.evaluation.reference import (
    ADM_STATISTICS_DETECTOR,
    ReferenceStats,
    load_reference,
    reference_statistics,
    reference_stats,
)
from repa.evaluation.sampling import balanced_labels, rank_slice
from repa.evaluation.scoring import score, summary_line

__all__ = [
    "ADM_IS_SPLIT_SIZE",
    "ADM_STATISTICS_DETECTOR",
    "INCEPTION_SHA1",
    "Activations",
    "Detector",
    "EncoderDetector",
    "EvaluationInputError",
    "FeatureStats",
    "InceptionDetector",
    "NpzError",
    "ReferenceStats",
    "balanced_labels",
    "classifier_search_paths",
    "compute_activations",
    "fid_from_stats",
    "find_inception_classifier",
    "frechet_distance",
    "image_batches",
    "inception_classifier",
    "inception_path",
    "inception_score",
    "load_reference",
    "make_detector",
    "manifold_radii",
    "npz_keys",
    "num_images",
    "open_npz_array",
    "precision_recall",
    "rank_slice",
    "read_npz_arrays",
    "reference_statistics",
    "reference_stats",
    "save_samples",
    "score",
    "score_activations",
    "summary_line",
    "tf_bilinear_resize",
]
