"""Linear probing of frozen features (REPA Sec. 3.2): parameter-free BatchNorm + linear layer, Adam, cosine LR."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass
class ProbeResult:
    """Accuracies of one linear probe (fractions in [0, 1]) and its final training loss."""

    train_acc: float
    test_acc: float
    train_loss: float


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    return correct / max(len(x), 1)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int | None = None,
    epochs: int = 40,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """Train `BatchNorm1d(affine=False) -> Linear` with Adam and a per-step cosine schedule for a fixed number of epochs.

    Args:
        train_x, train_y: (N, D) features and (N,) int labels.
        test_x, test_y: held-out features and labels.
        num_classes: number of classes (default: max label + 1 over both splits).
        epochs: full passes over the training set.
        batch_size: minibatch size.
        lr: peak Adam learning rate (cosine-annealed to 0 over all steps).
        weight_decay: Adam weight decay.
        seed: seeds the initialisation and the shuffling (the global RNG state is left untouched).
        device: where to train.

    Returns:
        ProbeResult with train/test accuracy (BatchNorm in eval mode, running statistics) and the last epoch's
        mean training loss.
    """
    train_x, test_x = train_x.float().to(device), test_x.float().to(device)
    train_y, test_y = train_y.long().to(device), test_y.long().to(device)
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max() if len(test_y) else 0)) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], num_classes))
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps_per_epoch, 1))
    g = torch.Generator().manual_seed(seed)
    loss_sum = 0.0
    for _ in range(epochs):
        model.train()
        loss_sum = 0.0
        for idx in torch.randperm(len(train_x), generator=g).split(batch_size):
            idx = idx.to(device)
            if len(idx) < 2:  # BatchNorm needs more than one sample per batch in train mode
                continue
            loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
    return ProbeResult(
        train_acc=_accuracy(model, train_x, train_y, 4096),
        test_acc=_accuracy(model, test_x, test_y, 4096),
        train_loss=loss_sum / len(train_x),
    )


def split_indices(num: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random (train, test) split of range(num)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    num_test = max(1, int(round(num * test_fraction)))
    return perm[num_test:].sort().values, perm[:num_test].sort().values


def probe_layers(
    features: Mapping[tuple[int, float], Tensor],
    labels: Tensor,
    test_fraction: float = 0.2,
    test_mask: Tensor | None = None,
    seed: int = 0,
    **probe_kwargs,
) -> list[dict[str, float | int]]:
    """Linear-probe every (layer, t) feature set with the same train/test split.

    Args:
        features: {(layer, t): (N, D)}, e.g. from `repa.analysis.collect_hidden_states`.
        labels: (N,) class labels shared by all entries.
        test_fraction: held-out fraction for the seeded random split (ignored when `test_mask` is given).
        test_mask: (N,) bool, True for test items (e.g. a dataset's official test split).
        seed: split and probe seed.
        **probe_kwargs: forwarded to `linear_probe` (epochs, lr, batch_size, weight_decay, device, num_classes).

    Returns:
        Rows {"layer", "t", "train_acc", "test_acc", "train_loss"} sorted by (layer, t).
    """
    labels = torch.as_tensor(labels).long()
    if test_mask is not None:
        test_mask = torch.as_tensor(test_mask, dtype=torch.bool)
        train_idx, test_idx = (~test_mask).nonzero().flatten(), test_mask.nonzero().flatten()
    else:
        train_idx, test_idx = split_indices(len(labels), test_fraction, seed)
    probe_kwargs.setdefault("num_classes", int(labels.max()) + 1)
    rows = []
    for layer, t in sorted(features):
        feats = features[(layer, t)]
        if len(feats) != len(labels):
            raise ValueError(f"features for (layer={layer}, t={t}) have {len(feats)} rows, labels {len(labels)}")
        res = linear_probe(
            feats[train_idx], labels[train_idx], feats[test_idx], labels[test_idx], seed=seed, **probe_kwargs
        )
        rows.append({"layer": int(layer), "t": float(t), **asdict(res)})
    return rows
