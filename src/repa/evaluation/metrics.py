"""Sample-quality metrics on detector features: Fréchet distance (FID/sFID), Inception Score, precision/recall.

Definitions follow ADM's evaluator (`guided-diffusion/evaluations/evaluator.py`), which REPA reports with:
covariance with N - 1, FID by `scipy.linalg.sqrtm` of the covariance product with the 1e-6 diagonal offset retry,
Inception Score over consecutive chunks of 5,000 samples (`compute_inception_score(split_size=5000)`), and k = 3
nearest-neighbour manifolds for improved precision/recall.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.linalg
import torch

from repa.errors import ReportedError

ADM_IS_SPLIT_SIZE = 5000  # guided-diffusion evaluations/evaluator.py: compute_inception_score(..., split_size=5000)


class EvaluationInputError(ReportedError, ValueError):
    """A damaged or mismatching evaluation input (statistics with NaN/inf or wrong shapes, statistics of another
    detector, an unreadable classifier file); the message names the file. A ValueError, as callers expect."""

    exit_code = 2


def check_gaussian(mu: np.ndarray, sigma: np.ndarray, what: str) -> None:
    """Raise EvaluationInputError unless `mu` is a finite (D,) vector and `sigma` a finite (D, D) matrix.

    Args:
        mu, sigma: the mean and covariance of a set of features.
        what: how the message names them, e.g. "ref.npz: precomputed mu/sigma".
    """
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise EvaluationInputError(f"{what}: mean {mu.shape} and covariance {sigma.shape} are not (D,) and (D, D)")
    if not (np.issubdtype(mu.dtype, np.number) and np.issubdtype(sigma.dtype, np.number)):
        raise EvaluationInputError(f"{what}: mean/covariance are {mu.dtype}/{sigma.dtype}, not numbers")
    for name, arr in (("mean", mu), ("covariance", sigma)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise EvaluationInputError(f"{what}: the {name} has {bad} NaN/inf values; the file is damaged")


class FeatureStats:
    """Running mean/covariance of feature vectors in float64, mergeable and savable without pickle.

    Accumulates the count, sum and sum of outer products, so per-process statistics merge by plain addition
    (`merge`, or an all-reduce SUM of `packed()`), like EDM's FeatureStats. Float64 sums keep the covariance accurate
    for the usual 50k x 2048 Inception features (relative cancellation error ~ 1e-16 * (|mean| / std)^2 * N).

    Args:
        dim: feature dimension D.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.num = 0
        self._sum = np.zeros(self.dim, dtype=np.float64)
        self._sum_outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, feats: np.ndarray | torch.Tensor) -> None:
        """Add a batch of features (B, D)."""
        if isinstance(feats, torch.Tensor):
            feats = feats.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features (B, {self.dim}), got {x.shape}")
        self.num += len(x)
        self._sum += x.sum(axis=0)
        self._sum_outer += x.T @ x

    @classmethod
    def from_features(cls, feats: np.ndarray | torch.Tensor) -> FeatureStats:
        """Statistics of one (N, D) array."""
        stats = cls(feats.shape[1])
        stats.update(feats)
        return stats

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new FeatureStats over the union of both sets of samples."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {self.dim} and {other.dim}")
        out = FeatureStats(self.dim)
        out.num = self.num + other.num
        out._sum = self._sum + other._sum
        out._sum_outer = self._sum_outer + other._sum_outer
        return out

    def packed(self) -> torch.Tensor:
        """[num, sum (D), sum_outer (D*D)] as one float64 tensor: all-reduce it with SUM, then `unpacked`."""
        return torch.from_numpy(np.concatenate([[float(self.num)], self._sum, self._sum_outer.ravel()]))

    @classmethod
    def unpacked(cls, packed: torch.Tensor, dim: int) -> FeatureStats:
        """Inverse of `packed` (e.g. after `repa.distributed.all_reduce_sum`)."""
        arr = packed.detach().to("cpu", torch.float64).numpy()
        if arr.size != 1 + dim + dim * dim:
            raise ValueError(f"packed stats of size {arr.size} do not match dim {dim}")
        stats = cls(dim)
        stats.num = int(round(arr[0]))
        stats._sum = arr[1 : 1 + dim].copy()
        stats._sum_outer = arr[1 + dim :].reshape(dim, dim).copy()
        return stats

    @property
    def mean(self) -> np.ndarray:
        """(D,) float64 mean."""
        if self.num < 1:
            raise ValueError("no features accumulated")
        return self._sum / self.num

    @property
    def cov(self) -> np.ndarray:
        """(D, D) float64 unbiased covariance (N - 1, as np.cov and ADM)."""
        if self.num < 2:
            raise ValueError("the covariance needs at least 2 samples")
        mu = self.mean
        cov = (self._sum_outer - self.num * np.outer(mu, mu)) / (self.num - 1)
        return (cov + cov.T) / 2  # exact symmetry for sqrtm/eigh

    def save(self, path: str | Path) -> None:
        """Write an .npz with `mu`, `sigma`, `num` and the raw sums (plain arrays; readable without pickle)."""
        np.savez(path, mu=self.mean, sigma=self.cov, num=np.int64(self.num), sum=self._sum, sum_outer=self._sum_outer)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a file written by `save` (np.load(allow_pickle=False)); a damaged file is an EvaluationInputError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                stats = cls(int(data["sum"].shape[0]))
                stats.num = int(data["num"])
                stats._sum = data["sum"].astype(np.float64)
                stats._sum_outer = data["sum_outer"].astype(np.float64).reshape(stats.dim, stats.dim)
        except (zipfile.BadZipFile, EOFError, KeyError, ValueError, IndexError) as err:
            raise EvaluationInputError(
                f"{path}: not readable as feature statistics ({type(err).__name__}: {err})"
            ) from err
        if not (np.isfinite(stats._sum).all() and np.isfinite(stats._sum_outer).all()):
            raise EvaluationInputError(f"{path}: the feature statistics hold NaN/inf values; the file is damaged")
        return stats


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
    method: Literal["sqrtm", "eigh"] = "sqrtm",
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Args:
        mu1, sigma1, mu2, sigma2: means (D,) and covariances (D, D).
        eps: "sqrtm" only: diagonal offset added to both covariances when the square root is not finite (as ADM /
            pytorch-fid / TTUR).
        method: "sqrtm" = ADM's formulation (scipy's matrix square root of S1 S2; imaginary parts dropped when the
            diagonal's are below 1e-3, else ValueError). "eigh" = Tr (S1 S2)^(1/2) as the sum of square roots of the
            eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (negative round-off clipped to 0): never
            complex, no retry needed. They agree to ~1e-9 relative on well-conditioned inputs (tests).

    Returns:
        The distance as a Python float.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: singular product; adding {eps} to the covariance diagonals", stacklevel=3)
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def fid_from_stats(a: FeatureStats, b: FeatureStats, **kwargs) -> float:
    """Fréchet distance between two FeatureStats (FID on pool features, sFID on spatial features)."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov, **kwargs)


def inception_score(
    probs_or_logits: np.ndarray | torch.Tensor,
    *,
    split_size: int = ADM_IS_SPLIT_SIZE,
    num_splits: int | None = None,
    logits: bool = False,
) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) over consecutive chunks of the samples, as ADM computes it.

    ADM (`guided-diffusion/evaluations/evaluator.py`, `Evaluator.compute_inception_score(activations,
    split_size=5000)`): softmax of `pool_3 @ W` (the graph's `softmax/logits/MatMul` weights, no bias), then for
    `i in range(0, N, 5000)` the chunk `preds[i : i + 5000]` scores `exp(mean_x sum_y p log(p / mean_chunk p))`, and
    the result is the plain mean of the chunk scores. So N = 50,000 gives 10 chunks of 5,000, N = 10,000 two and
    N <= 5,000 one; when 5,000 does not divide N the last, smaller chunk is a chunk of its own and weighs as much as
    a full one in the mean (e.g. N = 5,001 averages a 5,000-sample score with the score of 1 sample, which is 1).
    ADM returns no spread; `std` here is the standard deviation of the chunk scores (0 for one chunk).

    Differences from ADM: the softmax is taken in float64 (ADM: TF float32) and 0 * log 0 terms count as 0 (ADM's
    formula gives NaN when a float32 probability underflows to 0).

    Args:
        probs_or_logits: (N, C) class probabilities, or logits when `logits=True`.
        split_size: ADM's chunk size (5000); keyword-only so an old positional `num_splits` cannot be mistaken for it.
        num_splits: instead of `split_size`, this many near-equal contiguous splits (`i * N // num_splits`, the
            StyleGAN/EDM/torch-fidelity convention; identical to ADM's chunks when N = 5000 * num_splits).
        logits: whether the input holds logits.

    Returns:
        (mean, std) of the per-chunk scores.
    """
    if isinstance(probs_or_logits, torch.Tensor):
        probs_or_logits = probs_or_logits.detach().cpu().double().numpy()
    x = np.asarray(probs_or_logits, dtype=np.float64)
    if logits:
        x = np.exp(x - x.max(axis=1, keepdims=True))
        x /= x.sum(axis=1, keepdims=True)
    n = len(x)
    if num_splits is not None:
        if x.ndim != 2 or n < num_splits or num_splits < 1:
            raise ValueError(f"need (N, C) predictions with N >= num_splits={num_splits}, got {x.shape}")
        bounds = [(i * n // num_splits, (i + 1) * n // num_splits) for i in range(num_splits)]
    else:
        if x.ndim != 2 or n < 1 or split_size < 1:
            raise ValueError(f"need (N, C) predictions with N >= 1 and split_size >= 1, got {x.shape}, {split_size}")
        bounds = [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
    scores = []
    for start, stop in bounds:
        part = x[start:stop]
        p_y = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(p_y)), 0.0)
        scores.append(math.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def is_num_splits(num: int, split_size: int = ADM_IS_SPLIT_SIZE) -> int:
    """How many chunks ADM's Inception Score averages over for `num` samples: ceil(num / split_size)."""
    return -(-num // split_size)


def _sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (|u|^2 - 2 u.v + |v|^2, clipped at 0), as ADM's DistanceBlock."""
    d = (u * u).sum(1, keepdim=True) - 2.0 * (u @ v.T) + (v * v).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(feats: torch.Tensor, k: int = 3, batch_size: int = 4096) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (the point itself excluded).

    Args:
        feats: (N, D) features.
        k: neighbourhood size (ADM: 3).
        batch_size: rows per distance block.

    Returns:
        (N,) squared radii (ADM keeps squared distances; comparisons are equivalent).
    """
    if len(feats) <= k:
        raise ValueError(f"need more than k={k} points, got {len(feats)}")
    radii = torch.empty(len(feats), dtype=feats.dtype, device=feats.device)
    for start in range(0, len(feats), batch_size):
        d = _sq_distances(feats[start : start + batch_size], feats)
        # sorted row: index 0 is the point itself (distance 0), index k is its k-th neighbour (ADM's partition)
        radii[start : start + batch_size] = torch.kthvalue(d, k + 1, dim=1).values
    return radii


def precision_recall(
    ref_feats: np.ndarray | torch.Tensor,
    sample_feats: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's ManifoldEstimator computes them.

    A sample is "in" the reference manifold if it lies within the k-NN radius of any reference point; precision is
    the fraction of samples in the reference manifold and recall the fraction of references in the sample manifold.
    Distances are computed in float32 (ADM tries float16 first and falls back to float32).

    Args:
        ref_feats: (N1, D) reference features (ADM: 10,000 pool features of the reference batch).
        sample_feats: (N2, D) sample features.
        k: neighbourhood size.
        batch_size: block size of the distance computation (memory ~ batch_size * N * 4 bytes).
        device: where to compute (default: the tensor's device, CPU for numpy input).

    Returns:
        (precision, recall).
    """
    ref = torch.as_tensor(ref_feats, device=device).float()
    sam = torch.as_tensor(sample_feats, device=device or ref.device).float()
    r_ref, r_sam = manifold_radii(ref, k, batch_size), manifold_radii(sam, k, batch_size)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)  # reference inside the sample manifold
    sam_in = torch.zeros(len(sam), dtype=torch.bool, device=ref.device)  # sample inside the reference manifold
    for i in range(0, len(ref), batch_size):
        for j in range(0, len(sam), batch_size):
            d = _sq_distances(ref[i : i + batch_size], sam[j : j + batch_size])  # (b1, b2)
            ref_in[i : i + batch_size] |= (d <= r_sam[None, j : j + batch_size]).any(dim=1)
            sam_in[j : j + batch_size] |= (d <= r_ref[i : i + batch_size, None]).any(dim=0)
    return float(sam_in.double().mean()), float(ref_in.double().mean())
