"""iREPA's spatial-structure scores (`repa.analysis.spatial`: LDS, CDS, RMSC) over a dataset, batch by batch: the
`--spatial` columns of `repa align` for model layers and encoders, and the ranking of candidate target encoders
before any training (`repa align --encoder A,B --spatial`).

Each score is a mean over images, so the image-weighted mean of per-batch scores is the score of all images: the
tokens (num_images, T, D) never have to be held at once. A grid too small for a score gives NaN (LDS needs a token
pair at Manhattan distance >= 6, i.e. h + w >= 8; CDS needs two distances, h + w >= 4), never an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from repa import encoders
from repa.analysis.inputs import default_device
from repa.analysis.report import write_csv, write_json
from repa.analysis.spatial import _grid, cds, lds, rmsc
from repa.data.sources import source_batches

__all__ = ["SPATIAL", "SpatialMean", "encoder_features", "grid_scores", "long_rows", "ranked", "run_rank_encoders"]

SPATIAL = ("lds", "cds", "rmsc")  # the column / metric names, iREPA's defaults (LDS far distance 6, CDS dmax 8)
FAR_DIST = 6


def grid_scores(tokens_NTD: Tensor, grid_hw: tuple[int, int] | None = None) -> dict[str, float]:
    """`spatial_metrics(tokens, grid_hw)` with NaN for a score the grid is too small for.

    Args:
        tokens_NTD: (num_images, T, D) tokens on a row-major grid.
        grid_hw: the grid (square when None).
    """
    h, w = _grid(tokens_NTD, grid_hw)
    span = h + w - 2  # the largest Manhattan distance on the grid
    return {
        "lds": lds(tokens_NTD, (h, w), far_dist=FAR_DIST) if span >= FAR_DIST else math.nan,
        "cds": cds(tokens_NTD, (h, w)) if span >= 2 else math.nan,
        "rmsc": rmsc(tokens_NTD),
    }


class SpatialMean:
    """Image-weighted running mean of `grid_scores` over batches of one feature set (an encoder layer, a model
    layer at one t): `add(tokens, grid_hw)` per batch, then `result()`."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(SPATIAL, 0.0)
        self.count = 0

    def add(self, tokens_NTD: Tensor, grid_hw: tuple[int, int] | None = None) -> None:
        n = int(tokens_NTD.shape[0])
        for key, value in grid_scores(tokens_NTD, grid_hw).items():
            self.sums[key] += value * n
        self.count += n

    def result(self) -> dict[str, float]:
        """{"lds", "cds", "rmsc"} over every image added (NaN before any)."""
        return {k: s / self.count if self.count else math.nan for k, s in self.sums.items()}


def long_rows(scores: Mapping[tuple[int, float], SpatialMean], target: str = "self") -> list[dict[str, Any]]:
    """Rows {layer, t, target, metric, value} (the layout of `alignment_table`) of per-(layer, t) scores; `target`
    says the scores are the layer's own ("self")."""
    return [
        {"layer": layer, "t": t, "target": target, "metric": metric, "value": value}
        for metric in SPATIAL
        for (layer, t), acc in sorted(scores.items())
        for value in [acc.result()[metric]]
    ]


def ranked(rows: Iterable[dict[str, Any]], key: str = "lds") -> list[dict[str, Any]]:
    """Rows sorted by `key`, highest first (iREPA: higher LDS, a better target), NaN last."""
    return sorted(rows, key=lambda r: (math.isnan(r[key]), -r[key] if not math.isnan(r[key]) else 0.0))


@torch.no_grad()
def encoder_features(
    name: str,
    images: Tensor,
    resolution: int = 224,
    layer: int | None = None,
    weights: str | None = None,
    batch_size: int = 125,
    device: torch.device | None = None,
    progress: bool = True,
    spatial: SpatialMean | None = None,
) -> Tensor:
    """Mean patch tokens (N, D) of a `repa.encoders` encoder on uint8 images (N, 1|3, H, W); `spatial` also
    accumulates the spatial-structure scores of the unpooled tokens on the encoder's grid, in the same pass."""
    device = device or default_device()
    encoder = encoders.load_encoder(name, resolution, weights=weights, layer=layer, device=device)  # patchable
    out = []
    for batch in tqdm(images.split(batch_size), desc=f"{name} features", disable=not progress):
        tokens = encoder(batch.to(device)).float()
        if spatial is not None:
            spatial.add(tokens, tuple(encoder.token_grid))
        out.append(tokens.mean(dim=1).cpu())
    return torch.cat(out)


def source_images(source: str | Path, num: int, resolution: int) -> Tensor:
    """uint8 images (N, C, H, W) of `source` (`fashion-mnist:<split>`, an image folder or an ADM `.npz`)."""
    batches, _ = source_batches(source, 250, num, resolution=resolution)
    return torch.cat([b if isinstance(b, Tensor) else torch.from_numpy(b).permute(0, 3, 1, 2) for b in batches])


def encoder_layers(
    name: str, images: Tensor, layers: Sequence[int | None], res: int, device: torch.device, progress: bool,
    spatial_rows: list[dict[str, Any]] | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """{"L04" | "final": mean patch tokens} of an encoder's layers; with `spatial_rows`, one row
    {encoder, resolution, layer, lds, cds, rmsc} per layer is appended (same pass)."""
    out = {}
    for lay in layers:
        key, acc = "final" if lay is None else f"L{lay:02d}", SpatialMean() if spatial_rows is not None else None
        out[key] = encoder_features(name, images, res, lay, device=device, progress=progress, spatial=acc)
        if acc is not None:
            spatial_rows.append({"encoder": name, "resolution": res, "layer": key, **acc.result()})  # type: ignore[union-attr]
    return out


def run_rank_encoders(
    names: Sequence[str],
    layers: Sequence[int | None] = (None,),
    resolution: int = 224,
    source: str | Path = "fashion-mnist:test",
    num: int = 1000,
    out_dir: str | Path | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """Rank candidate target encoders before training by the spatial-structure scores of their patch tokens (LDS
    first: iREPA finds it predicts a target's benefit to generation better than linear-probe accuracy); no model.

    Args:
        names: `repa.encoders` names.
        layers: layers of each encoder (1-indexed; None = after the final block).
        resolution: input side of every encoder.
        source: images: `fashion-mnist:<split>`, an image folder, or an ADM `.npz` (see `source_batches`).
        num: number of images.
        out_dir: where `spatial.csv` and `spatial.json` go (default `analysis/rank-encoders`).
        device, progress, write: where to run, tqdm bars, write the files.

    Returns:
        {"rows": [{encoder, resolution, layer, lds, cds, rmsc}] highest LDS first, "out_dir", "meta"}; layer
        labels are "L04" or "final".
    """
    device = device or default_device()
    images = source_images(source, num, resolution)
    rows: list[dict[str, Any]] = []
    for name in names:
        encoder_layers(name, images, layers, resolution, device, progress, spatial_rows=rows)
    rows = ranked(rows)
    meta = {"source": str(source), "num": len(images), "resolution": resolution, "ranked_by": "lds"}
    out = Path(out_dir) if out_dir else Path("analysis") / "rank-encoders"
    if write:
        write_csv(rows, out / "spatial.csv")
        write_json({"meta": meta, "rows": rows}, out / "spatial.json")
    return {"rows": rows, "out_dir": str(out), "meta": meta}
