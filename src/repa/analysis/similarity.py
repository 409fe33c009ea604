"""Representation similarity: CKNNA, CKA (biased/unbiased HSIC) and mutual k-NN, as Huh et al. 2024 define them.

Definitions follow the reference implementation of "The Platonic Representation Hypothesis" (platonic-rep,
`metrics.py`), which REPA uses for its alignment analysis (CKNNA, k = 10):

- linear kernels K = A A^T, L = B B^T on the (prepared) features;
- `hsic_biased(K, L) = tr(K H L H)` with H = I - 1/n (no 1/(n-1)^2 factor: it cancels in CKA);
- `hsic_unbiased` = Song et al. 2012, eq. 5, on kernels with zeroed diagonals, divided by n (n - 3);
- CKA = HSIC(K, L) / (sqrt(HSIC(K, K) HSIC(L, L)) + 1e-6);
- CKNNA (unbiased, the default): the kernels' diagonals are set to -inf, each row keeps its top-k entries
  (`torch.topk`, so the point itself is never a neighbour), the mask is the elementwise product of the two row-wise
  k-NN masks, and CKNNA = HSIC_u(M*K, M*L) / (sqrt(HSIC_u(M_K*K, M_K*K) HSIC_u(M_L*L, M_L*L)) + 1e-6);
  The masks are row-wise, so the masked kernels are not symmetric and CKNNA(A, B) differs slightly from
  CKNNA(B, A) (as in the reference); `alignment_table` passes model features first, targets second;
- mutual k-NN = mean over points of |kNN_A(i) ∩ kNN_B(i)| / k, self excluded.

The reference pipeline (`measure_alignment.py`) prepares features before any metric: it clamps outliers to the
0.95 quantile of |x| (per-row quantiles averaged, their default non-"precise" mode) and L2-normalises each row; its
`platonic.Alignment.score` API clamps at 0.95 too (exact quantile), while the bare metric functions of its
`metrics.py` do not clamp. `prepare_features` does the same; `alignment` applies it and then the metric. The clamp
is on by default (q = 0.95, as the reference); `outlier_quantile=None` turns it off (`repa align --outlier-quantile`,
recorded in `align.json`). Here each feature set (one layer at one t, or the target) gets its own quantile. Computations run in float64 here
(the reference runs float32 on GPU), so values agree up to float32 round-off.
"""

from __future__ import annotations

from typing import Literal

import torch

Metric = Literal["cknna", "cka", "unbiased_cka", "mutual_knn"]


def hsic_biased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """tr(K H L H), H = I - 1/n: the (unnormalised) biased HSIC of the original CKA."""
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype, device=K.device) - 1.0 / n
    return torch.trace(K @ H @ L @ H)


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5) on kernels whose diagonals are zeroed; needs n > 3."""
    n = K.shape[0]
    if n <= 3:
        raise ValueError(f"unbiased HSIC needs more than 3 samples, got {n}")
    Kt = K.clone().fill_diagonal_(0)
    Lt = L.clone().fill_diagonal_(0)
    value = (Kt * Lt.T).sum() + Kt.sum() * Lt.sum() / ((n - 1) * (n - 2)) - 2.0 * (Kt @ Lt).sum() / (n - 2)
    return value / (n * (n - 3))


def _as_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
        raise ValueError(f"expected paired features (N, D1), (N, D2), got {tuple(a.shape)}, {tuple(b.shape)}")
    return a.double(), b.to(a.device).double()


def cka(feats_a: torch.Tensor, feats_b: torch.Tensor, unbiased: bool = False) -> float:
    """Linear CKA between paired features (N, D1), (N, D2), with the reference's +1e-6 in the denominator.

    Args:
        feats_a, feats_b: row i of both describes the same input.
        unbiased: use the unbiased HSIC estimator (platonic-rep's `unbiased_cka`).

    Returns:
        CKA in [0, 1] (up to estimator noise for the unbiased version).
    """
    a, b = _as_pair(feats_a, feats_b)
    K, L = a @ a.T, b @ b.T
    hsic = hsic_unbiased if unbiased else hsic_biased
    return float(hsic(K, L) / (torch.sqrt(hsic(K, K) * hsic(L, L)) + 1e-6))


def _knn_mask(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise top-k mask of a similarity kernel with the diagonal excluded (set to -inf before topk)."""
    n = kernel.shape[0]
    idx = torch.topk(kernel.clone().fill_diagonal_(float("-inf")), k, dim=1).indices
    return torch.zeros(n, n, dtype=kernel.dtype, device=kernel.device).scatter_(1, idx, 1.0)


def cknna(feats_a: torch.Tensor, feats_b: torch.Tensor, k: int = 10) -> float:
    """Centered Kernel Nearest-Neighbour Alignment (Huh et al. 2024), the unbiased variant of the reference.

    Args:
        feats_a, feats_b: paired features (N, D1), (N, D2).
        k: neighbours per point (2 <= k <= N - 1); k = N - 1 gives unbiased CKA.

    Returns:
        CKNNA (1 for identical inputs, up to the 1e-6 in the denominator).
    """
    a, b = _as_pair(feats_a, feats_b)
    n = len(a)
    if not 2 <= k <= n - 1:
        raise ValueError(f"CKNNA needs 2 <= k <= N - 1 = {n - 1}, got k={k}")
    K, L = a @ a.T, b @ b.T
    mask_k, mask_l = _knn_mask(K, k), _knn_mask(L, k)
    mask = mask_k * mask_l
    sim_kl = hsic_unbiased(mask * K, mask * L)
    sim_kk = hsic_unbiased(mask_k * K, mask_k * K)
    sim_ll = hsic_unbiased(mask_l * L, mask_l * L)
    return float(sim_kl) / float(torch.sqrt(sim_kk * sim_ll) + 1e-6)


def mutual_knn(feats_a: torch.Tensor, feats_b: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of shared k nearest neighbours (inner-product similarity, self excluded).

    Args:
        feats_a, feats_b: paired features (N, D1), (N, D2).
        k: neighbours per point (1 <= k <= N - 1).

    Returns:
        A value in [0, 1].
    """
    a, b = _as_pair(feats_a, feats_b)
    if not 1 <= k <= len(a) - 1:
        raise ValueError(f"mutual k-NN needs 1 <= k <= N - 1 = {len(a) - 1}, got k={k}")
    shared = _knn_mask(a @ a.T, k) * _knn_mask(b @ b.T, k)
    return float((shared.sum(dim=1) / k).mean())


def prepare_features(
    feats: torch.Tensor, outlier_quantile: float | None = 0.95, exact: bool = False, normalize: bool = True
) -> torch.Tensor:
    """The reference pipeline's preprocessing: clamp outliers to a quantile of |x|, then L2-normalise rows.

    Args:
        feats: (N, D) features.
        outlier_quantile: q of platonic-rep's `remove_outliers` (None or 1 = no clamping).
        exact: the quantile over all entries (their "precise" mode) instead of per-row quantiles averaged.
        normalize: L2-normalise each row.

    Returns:
        (N, D) float32 features.
    """
    x = torch.as_tensor(feats).float()
    if outlier_quantile is not None and not 0 < outlier_quantile <= 1:
        raise ValueError(f"outlier_quantile must be in (0, 1] (1 or None: no clamp), got {outlier_quantile}")
    if outlier_quantile is not None and outlier_quantile < 1:
        if exact:
            flat = x.abs().flatten().sort().values
            q_val = flat[min(int(outlier_quantile * flat.numel()), flat.numel() - 1)]
        else:
            q_val = torch.quantile(x.abs().flatten(start_dim=1), outlier_quantile, dim=1).mean()
        x = x.clamp(-q_val, q_val)
    if normalize:
        x = torch.nn.functional.normalize(x, p=2, dim=-1)
    return x


def alignment(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    metric: Metric = "cknna",
    k: int = 10,
    outlier_quantile: float | None = 0.95,
    normalize: bool = True,
) -> float:
    """Prepare both feature sets as the reference pipeline does, then compute `metric`.

    Args:
        feats_a, feats_b: paired features (N, D1), (N, D2), e.g. pooled model hidden states and encoder features.
        metric: "cknna", "cka", "unbiased_cka" or "mutual_knn".
        k: neighbours for the k-NN metrics.
        outlier_quantile, normalize: see `prepare_features`.

    Returns:
        The similarity as a float.
    """
    a = prepare_features(feats_a, outlier_quantile, normalize=normalize)
    b = prepare_features(feats_b, outlier_quantile, normalize=normalize)
    if metric == "cknna":
        return cknna(a, b, k)
    if metric == "mutual_knn":
        return mutual_knn(a, b, k)
    if metric in ("cka", "unbiased_cka"):
        return cka(a, b, unbiased=metric == "unbiased_cka")
    raise ValueError(f"unknown metric {metric!r}; choose cknna, cka, unbiased_cka or mutual_knn")


def alignment_table(
    features: dict[tuple[int, float], torch.Tensor],
    targets: torch.Tensor | dict[str, torch.Tensor],
    metrics: tuple[Metric, ...] = ("cknna",),
    k: int = 10,
    outlier_quantile: float | None = 0.95,
    normalize: bool = True,
) -> list[dict[str, float | int | str]]:
    """Similarity of every (layer, t) feature set with one or more target feature sets (e.g. encoders).

    Args:
        features: {(layer, t): (N, D)} pooled model hidden states (`repa.analysis.collect_hidden_states`).
        targets: (N, D_enc) target features, or {name: (N, D_enc)} for several encoders.
        metrics: which metrics to compute.
        k, outlier_quantile, normalize: see `alignment`.

    Returns:
        Rows {"layer", "t", "target", "metric", "value"} sorted by (target, metric, layer, t).
    """
    if isinstance(targets, torch.Tensor):
        targets = {"target": targets}
    prepared = {name: prepare_features(feats, outlier_quantile, normalize=normalize) for name, feats in targets.items()}
    rows = []
    for name, target in prepared.items():
        for metric in metrics:
            for layer, t in sorted(features):
                a = prepare_features(features[(layer, t)], outlier_quantile, normalize=normalize)
                value = alignment(a, target, metric, k, outlier_quantile=None, normalize=False)
                rows.append({"layer": int(layer), "t": float(t), "target": name, "metric": metric, "value": value})
    return rows
