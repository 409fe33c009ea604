"""Drivers behind `repa probe` and `repa align`: load a model and its data (`repa.analysis.inputs`), collect pooled
hidden states per layer x t, run linear probes or alignment metrics (CKNNA/CKA/mutual k-NN), write CSV/JSON tables
and heat maps. Hidden states use the null label (REPA's protocol) and the run's interpolation path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from repa.analysis.hooks import collect_hidden_states
from repa.analysis.inputs import default_device, load_inputs
from repa.analysis.probe import probe_layers, split_indices
from repa.analysis.report import write_csv, write_tables
from repa.analysis.similarity import alignment, alignment_table
from repa.analysis.structure import (
    SPATIAL,
    SpatialMean,
    encoder_features,
    encoder_layers,
    long_rows,
    ranked,
    source_images,
)
from repa.convert import DDPMAnalysisView
from repa.loading import LoadedModel, load_model

METRICS = ("cknna", "cka", "unbiased_cka", "mutual_knn")
OUTLIER_QUANTILE = 0.95  # platonic-rep's default `remove_outliers` clamp, applied by its alignment pipelines


def check_outlier_quantile(q: float | None) -> float | None:
    """The clamp setting of `repa align`: None (or 1, the reference's "off") -> None, else a q in (0, 1)."""
    if q is None or float(q) == 1.0:
        return None
    q = float(q)
    if not 0.0 < q < 1.0:
        raise ValueError(f"the outlier quantile must be in (0, 1], or None to turn the clamp off; got {q}")
    return q


def parse_layers(spec: str | Sequence[int] | None, depth: int) -> list[int]:
    """ "all" / None -> 1..depth; "1,3,5" or a sequence -> those blocks (1-indexed, checked against depth)."""
    if spec is None or spec == "all":
        return list(range(1, depth + 1))
    layers = [int(v) for v in spec.split(",") if v.strip()] if isinstance(spec, str) else [int(v) for v in spec]
    bad = [v for v in layers if not 1 <= v <= depth]
    if bad or not layers:
        raise ValueError(f"layers {bad or spec} outside 1..{depth} (the model has {depth} blocks)")
    return sorted(set(layers))


def parse_floats(spec: str | Sequence[float]) -> list[float]:
    """ "0,0.25,0.5" or a sequence -> floats."""
    values = [float(v) for v in spec.split(",") if v.strip()] if isinstance(spec, str) else [float(v) for v in spec]
    if not values:
        raise ValueError("no values given")
    return values


def _as_loaded(
    checkpoint: str | Path | LoadedModel, device: torch.device, num_heads: int | None = None,
    align_depth: int | None = None,
) -> LoadedModel:  # fmt: skip
    """The checkpoint (`num_heads`, `align_depth`: see `repa.loading.load_model`), with a DDPM model (official DiT,
    repa `transport.diffusion=ddpm`) seen through `repa.convert.DDPMAnalysisView`: inputs are noised on the linear
    path at REPA time t and handed to the DDPM model at the step with the same signal-to-noise ratio, so a time t
    means the same noise level for SiT and DiT."""
    if isinstance(checkpoint, LoadedModel):
        loaded = checkpoint
    else:
        loaded = load_model(checkpoint, device=device, num_heads=num_heads, align_depth=align_depth)
    ddpm = loaded.cfg.transport.diffusion == "ddpm" or loaded.info.get("format") == "dit"
    if ddpm and not isinstance(loaded.model, DDPMAnalysisView):
        loaded = dataclasses.replace(loaded, model=DDPMAnalysisView(loaded.model))
    return loaded


def model_features(
    loaded: LoadedModel,
    x: Tensor,
    layers: Sequence[int],
    times: Sequence[float],
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = True,
    spatial: dict[tuple[int, float], SpatialMean] | None = None,
) -> dict[tuple[int, float], Tensor]:
    """Mean-pooled hidden states {(layer, t): (N, D)} with the null label (see `collect_hidden_states`); a
    `spatial` dict is filled with the spatial-structure scores of the unpooled tokens per (layer, t), same pass."""
    batches = tqdm(x.split(batch_size), desc="hidden states", disable=not progress)
    device = next(loaded.model.parameters()).device

    def on_tokens(layer: int, t: float, tokens: Tensor) -> None:
        spatial.setdefault((layer, t), SpatialMean()).add(tokens)  # type: ignore[union-attr]

    return collect_hidden_states(loaded.model, batches, layers, times, path=loaded.cfg.transport.path, seed=seed,
                                 device=device, on_tokens=None if spatial is None else on_tokens)  # fmt: skip


def _out_dir(out_dir: str | Path | None, loaded: LoadedModel | None, name: str) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if loaded is not None and loaded.run_dir is not None:
        return loaded.run_dir / "analysis" / f"{name}-{loaded.path.name}"
    return Path("analysis") / name


def _meta(loaded: LoadedModel) -> dict[str, Any]:
    return {"checkpoint": str(loaded.path), "step": loaded.info.get("step"), "ema": loaded.info.get("ema")}


def _parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    """ "cknna,cka" or a sequence -> names of `METRICS` (ValueError naming unknown ones)."""
    metric_list = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    if bad := [m for m in metric_list if m not in METRICS]:
        raise ValueError(f"unknown metrics {bad}; choose from {', '.join(METRICS)}")
    return metric_list


def run_probe(
    checkpoint: str | Path | LoadedModel,
    layers: str | Sequence[int] | None = "all",
    times: str | Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    num_train: int = 2000,
    num_test: int = 1000,
    epochs: int = 40,
    lr: float = 1e-3,
    probe_batch_size: int = 256,
    batch_size: int = 250,
    seed: int = 0,
    out_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    test_root: str | Path | None = None,
    vae: str | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    write: bool = True,
    num_heads: int | None = None,
    align_depth: int | None = None,
) -> dict[str, Any]:
    """Linear-probe accuracy of pooled hidden states for every (layer, t) (REPA Sec. 3.2).

    Args:
        checkpoint: run folder, checkpoint, official `.pt`, or an already loaded model.
        layers: "all", "1,2,3" or a list of 1-indexed blocks.
        times: noise levels t (0 = clean).
        num_train, num_test: class-balanced images for fitting and evaluating the probe.
        epochs, lr, probe_batch_size: probe training (`repa.analysis.linear_probe`).
        batch_size: images per model forward.
        seed: noise and probe seed.
        out_dir: where `probe.csv`, `probe.json`, `probe.png` go (default `<run>/analysis/probe-<step>`).
        data_root, test_root, vae: data for non-Fashion-MNIST checkpoints (without `test_root`, a seeded split of
            `data_root` is used).
        device: default cuda if available.
        progress: tqdm bars.
        write: write the files.
        num_heads, align_depth: what a checkpoint does not say about its architecture (`--num-heads`,
            `--align-depth`; see `repa.loading.load_model`); unused for an already loaded model.

    Returns:
        {"rows": [{layer, t, train_acc, test_acc, train_loss}], "out_dir", "meta"}.
    """
    device = device or default_device()
    loaded = _as_loaded(checkpoint, device, num_heads=num_heads, align_depth=align_depth)
    layer_list = parse_layers(layers, loaded.info["model_kwargs"]["depth"])
    time_list = parse_floats(times)
    fashion = data_root is None and loaded.is_repa and loaded.cfg.data.kind == "fashion-mnist"
    if not fashion and test_root is None:  # one folder: a seeded train/test split of it
        both = load_inputs(loaded, "train", num_train + num_test, data_root, vae, progress=progress)
        train_idx, test_idx = split_indices(len(both.labels), num_test / (num_train + num_test), seed)
        train, test = both.subset(train_idx), both.subset(test_idx)
    else:
        train = load_inputs(loaded, "train", num_train, data_root, vae, progress=progress)
        test = load_inputs(loaded, "test", num_test, test_root, vae, progress=progress)
    x = torch.cat([train.x, test.x])
    labels = torch.cat([train.labels, test.labels])
    test_mask = torch.arange(len(labels)) >= len(train.labels)
    feats = model_features(loaded, x, layer_list, time_list, batch_size, seed, progress)
    rows = probe_layers(feats, labels, test_mask=test_mask, seed=seed, num_classes=loaded.num_classes, epochs=epochs,
                        lr=lr, batch_size=probe_batch_size, device=device)  # fmt: skip
    meta = {**_meta(loaded), "num_train": len(train.labels), "num_test": len(test.labels), "epochs": epochs,
            "label": "null", "path": loaded.cfg.transport.path}  # fmt: skip
    out = _out_dir(out_dir, loaded, "probe")
    if write:
        write_tables(out, "probe", rows, meta, f"linear probe test accuracy ({loaded.path.name})", value="test_acc")
    return {"rows": rows, "out_dir": str(out), "meta": meta}


def default_encoder(
    loaded: LoadedModel, name: str | None, layer: int | str | None, resolution: int | None
) -> tuple[str, int | None, int, str | None]:
    """(name, layer, resolution, weights) of the target encoder: the run's configured one unless overridden.

    `layer` None means "the run's layer if it is the run's encoder, else the final layer"; "final" forces the final.
    """
    r = loaded.cfg.repa
    configured = r.encoders[0] if loaded.is_repa and r.encoders else None
    name = name or configured
    if name is None:
        raise ValueError("the checkpoint has no REPA encoder in its config: name one with --encoder")
    same = name == configured
    if layer is None:
        layer = r.encoder_layer if same else None
    elif layer == "final":
        layer = None
    weights = (r.encoder_weights or [None])[0] if same else None
    return name, None if layer is None else int(layer), resolution or (r.encoder_resolution if same else 224), weights


def run_align(
    checkpoint: str | Path | LoadedModel,
    encoder: str | None = None,
    encoder_layer: int | str | None = None,
    encoder_resolution: int | None = None,
    layers: str | Sequence[int] | None = "all",
    times: str | Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    num: int = 1000,
    metrics: str | Sequence[str] = ("cknna",),
    k: int = 10,
    split: str = "test",
    batch_size: int = 250,
    seed: int = 0,
    out_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    vae: str | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    write: bool = True,
    num_heads: int | None = None,
    align_depth: int | None = None,
    outlier_quantile: float | None = OUTLIER_QUANTILE,
    spatial: bool = False,
) -> dict[str, Any]:
    """Similarity between pooled hidden states per (layer, t) and an encoder's mean patch tokens on the same images.

    Args:
        checkpoint: run folder, checkpoint, official `.pt`, or an already loaded model.
        encoder, encoder_layer, encoder_resolution: the target (default: the run's REPA encoder, see
            `default_encoder`).
        layers, times: as in `run_probe`.
        num: number of images (class-balanced).
        metrics: "cknna,cka,..." or a list of `METRICS`.
        k: neighbours for CKNNA / mutual k-NN (REPA: 10).
        split: Fashion-MNIST split.
        batch_size, seed, data_root, vae, device, progress, write, num_heads, align_depth: as in `run_probe`.
        out_dir: where `align.csv`, `align.json`, `align-<metric>.png` go.
        outlier_quantile: before the metric, each feature set (every (layer, t) and the target, separately) is
            clamped to this quantile of |x| (the mean of per-row quantiles) and L2-normalised, as platonic-rep's
            alignment pipeline does by default (q = 0.95); None (or 1) skips the clamp. Recorded in the meta.
        spatial: also iREPA's spatial-structure scores (`repa.analysis.structure`) of each layer's unpooled tokens
            at each t, as rows with metric "lds" / "cds" / "rmsc" and target "self" (heat maps included), and of the
            encoder's tokens as meta["target_spatial"]; computed in the same passes.

    Returns:
        {"rows": [{layer, t, target, metric, value}], "out_dir", "meta"}.
    """
    outlier_quantile = check_outlier_quantile(outlier_quantile)
    device = device or default_device()
    loaded = _as_loaded(checkpoint, device, num_heads=num_heads, align_depth=align_depth)
    metric_list = _parse_metrics(metrics)
    name, layer, resolution, weights = default_encoder(loaded, encoder, encoder_layer, encoder_resolution)
    layer_list = parse_layers(layers, loaded.info["model_kwargs"]["depth"])
    inputs = load_inputs(loaded, split, num, data_root, vae, progress=progress)
    target_spatial, layer_spatial = (SpatialMean(), {}) if spatial else (None, None)
    target = encoder_features(name, inputs.images, resolution, layer, weights, device=device, progress=progress,
                              spatial=target_spatial)  # fmt: skip
    feats = model_features(loaded, inputs.x, layer_list, parse_floats(times), batch_size, seed, progress,
                           spatial=layer_spatial)  # fmt: skip
    label = f"{name}@{resolution}/{'final' if layer is None else f'l{layer}'}"
    rows = alignment_table(feats, {label: target}, tuple(metric_list), k=k,  # type: ignore[arg-type]
                           outlier_quantile=outlier_quantile)  # fmt: skip
    meta = {**_meta(loaded), "encoder": label, "num": len(inputs.labels), "k": k, "split": split,
            "outlier_quantile": outlier_quantile}  # fmt: skip
    if spatial:
        rows += long_rows(layer_spatial)  # type: ignore[arg-type]
        meta["target_spatial"], metric_list = target_spatial.result(), [*metric_list, *SPATIAL]  # type: ignore[union-attr]
    out = _out_dir(out_dir, loaded, "align")
    if write:
        write_tables(out, "align", rows, meta, f"{loaded.path.name} vs {label}", metric_list, value="value")
    return {"rows": rows, "out_dir": str(out), "meta": meta}


def run_align_encoders(
    encoder_a: str,
    encoder_b: str,
    layers_a: Sequence[int | None] = (None,),
    layers_b: Sequence[int | None] = (None,),
    resolution_a: int = 224,
    resolution_b: int = 224,
    source: str | Path = "fashion-mnist:test",
    num: int = 1000,
    metrics: str | Sequence[str] = ("cknna",),
    k: int = 10,
    out_dir: str | Path | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    write: bool = True,
    outlier_quantile: float | None = OUTLIER_QUANTILE,
    spatial: bool = False,
) -> dict[str, Any]:
    """Similarity between two encoders' mean patch tokens for every pair of layers (None = final layer).

    Args:
        encoder_a, encoder_b: `repa.encoders` names.
        layers_a, layers_b: layers to compare (1-indexed; None = after the final block).
        resolution_a, resolution_b: input sides.
        source: images: `fashion-mnist:<split>`, an image folder, or an ADM `.npz` (see `source_batches`).
        num: number of images.
        metrics, k, out_dir, device, progress, write, outlier_quantile: as in `run_align`.
        spatial: also each layer's spatial-structure scores (`run_rank_encoders`'s rows, highest LDS first) as
            result["spatial"], in `align.json` ("spatial") and `spatial.csv`.

    Returns:
        {"rows": [{a, b, layer_a, layer_b, metric, value}], "out_dir", "meta"} (+ "spatial"); layer labels are
        "L04" or "final".
    """
    outlier_quantile = check_outlier_quantile(outlier_quantile)
    device = device or default_device()
    metric_list = _parse_metrics(metrics)
    images = source_images(source, num, max(resolution_a, resolution_b))
    spatial_rows: list[dict[str, Any]] | None = [] if spatial else None
    fa = encoder_layers(encoder_a, images, layers_a, resolution_a, device, progress, spatial_rows)
    fb = encoder_layers(encoder_b, images, layers_b, resolution_b, device, progress, spatial_rows)
    measure = partial(alignment, k=k, outlier_quantile=outlier_quantile)
    rows = [
        {"a": encoder_a, "b": encoder_b, "layer_a": la, "layer_b": lb, "metric": m, "value": measure(xa, xb, m)}
        for m in metric_list
        for la, xa in fa.items()
        for lb, xb in fb.items()
    ]
    meta = {"a": f"{encoder_a}@{resolution_a}", "b": f"{encoder_b}@{resolution_b}", "source": str(source),
            "num": len(images), "k": k, "outlier_quantile": outlier_quantile}  # fmt: skip
    out = Path(out_dir) if out_dir else Path("analysis") / "align-encoders"
    extra = {} if spatial_rows is None else {"spatial": ranked(spatial_rows)}
    if write:
        write_tables(out, "align", rows, meta, f"{encoder_a} vs {encoder_b}", metric_list, extra, value="value",
                     row_key="layer_a", col_key="layer_b")  # fmt: skip
        if extra:
            write_csv(extra["spatial"], out / "spatial.csv")
    return {"rows": rows, "out_dir": str(out), "meta": meta, **extra}
