"""Drivers behind `repa probe` and `repa align`: load a model and its data, collect pooled hidden states per
layer x t, run linear probes or alignment metrics (CKNNA/CKA/mutual k-NN), write CSV/JSON tables and heat maps.

Data follow the checkpoint's own training data: Fashion-MNIST runs read the train split (probe fitting) and the test
split (probe evaluation, alignment), class-balanced first-N subsets, pixels x = image / 127.5 - 1. Other checkpoints
(ImageNet-layout folders, official latent-space SiT/DiT) need `data_root`, an ImageNet-layout image folder: images
are ADM-centre-cropped to the model's resolution and, for latent models, encoded with the SD-VAE (posterior mean x
0.18215). Hidden states use the null label (REPA's protocol) and the run's interpolation path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from repa.analysis.hooks import collect_hidden_states
from repa.analysis.probe import probe_layers, split_indices
from repa.analysis.report import heatmap, write_csv, write_json
from repa.analysis.similarity import alignment, alignment_table
from repa.convert import DDPMAnalysisView
from repa.evaluation.run import LoadedModel, fashion_mnist_images, load_model, source_batches

METRICS = ("cknna", "cka", "unbiased_cka", "mutual_knn")


@dataclass
class Inputs:
    """Paired model inputs and images: x (N, C, H, W) in the model's space, labels (N,), uint8 images for encoders."""

    x: Tensor
    labels: Tensor
    images: Tensor

    def subset(self, idx: Tensor) -> Inputs:
        return Inputs(self.x[idx], self.labels[idx], self.images[idx])


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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_loaded(checkpoint: str | Path | LoadedModel, device: torch.device) -> LoadedModel:
    """The checkpoint, with a DDPM model (official DiT, repa `transport.diffusion=ddpm`) seen through
    `repa.convert.DDPMAnalysisView`: inputs are noised on the linear path at REPA time t and handed to the DDPM
    model at the step with the same signal-to-noise ratio, so a time t means the same noise level for SiT and DiT."""
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint, device=device)
    ddpm = loaded.cfg.transport.diffusion == "ddpm" or loaded.info.get("format") == "dit"
    if ddpm and not isinstance(loaded.model, DDPMAnalysisView):
        loaded = dataclasses.replace(loaded, model=DDPMAnalysisView(loaded.model))
    return loaded


def _folder_images(root: str | Path, num: int | None, resolution: int, progress: bool) -> tuple[Tensor, Tensor]:
    """Class-balanced first-N images of an ImageNet-layout folder (ADM centre crop), loading only those."""
    import numpy as np

    from repa.data.folder import find_images, load_image
    from repa.training.data import balanced_subset

    samples, classes = find_images(root)
    labels = torch.tensor([c for _, c in samples])
    keep = balanced_subset(labels, num, len(classes)).tolist()
    images = [load_image(samples[i][0], resolution) for i in tqdm(keep, desc=f"images {root}", disable=not progress)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels[keep]


def load_inputs(
    loaded: LoadedModel,
    split: str,
    num: int | None,
    data_root: str | Path | None = None,
    vae: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Inputs:
    """Clean model inputs with their labels and images (see the module docstring for the data rules).

    Args:
        loaded: the model (its config says which data it was trained on).
        split: "train" or "test" (Fashion-MNIST; folders ignore it: pass the folder of that split).
        num: class-balanced first-N subset size (None = all).
        data_root: an ImageNet-layout folder (required for anything but Fashion-MNIST runs).
        vae: SD-VAE hub id or folder for latent models (default: the run's `data.vae`).
        batch_size: VAE batch size.
        progress: tqdm bars.
    """
    cfg, (c, size, _) = loaded.cfg, loaded.sample_shape
    latent = cfg.data.space == "latent"
    root = data_root or (cfg.data.root if loaded.is_repa and cfg.data.kind == "folder" else None)
    if root is None and loaded.is_repa and cfg.data.kind == "fashion-mnist":
        images, labels = fashion_mnist_images(split, num, cfg.data.root)
    elif root is None:
        what = "an ImageNet-layout image folder and the SD-VAE (--vae)" if latent else "an image folder"
        raise ValueError(
            f"this checkpoint was trained on {cfg.data.kind if loaded.is_repa else 'ImageNet latents'}: pass "
            f"--data-root with {what} (one subfolder per class, e.g. ImageNet val) to probe or align it"
        )
    else:
        vae_model = None
        if latent:
            from repa.data.vae import VAE

            vae_model = VAE.from_pretrained(vae or cfg.data.vae, device=str(default_device()))
        images, labels = _folder_images(root, num, size * (vae_model.downsample if vae_model else 1), progress)
        if vae_model is not None:
            chunks = []
            for batch in tqdm(images.split(batch_size), desc="VAE encode", disable=not progress):
                mean, _ = vae_model.encode_moments(batch.float() / 127.5 - 1.0)
                chunks.append((mean * vae_model.scale).cpu())
            return Inputs(torch.cat(chunks), labels, images)
    x = images.float() / 127.5 - 1.0
    if tuple(x.shape[1:]) != (c, size, size):
        raise ValueError(f"data of shape {tuple(x.shape[1:])} does not fit the model's input {(c, size, size)}")
    return Inputs(x, labels, images)


def model_features(
    loaded: LoadedModel,
    x: Tensor,
    layers: Sequence[int],
    times: Sequence[float],
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = True,
) -> dict[tuple[int, float], Tensor]:
    """Mean-pooled hidden states {(layer, t): (N, D)} with the null label (see `collect_hidden_states`)."""
    batches = tqdm(x.split(batch_size), desc="hidden states", disable=not progress)
    device = next(loaded.model.parameters()).device
    return collect_hidden_states(loaded.model, batches, layers, times, path=loaded.cfg.transport.path, seed=seed,
                                 device=device)  # fmt: skip


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
) -> Tensor:
    """Mean patch tokens (N, D) of a `repa.encoders` encoder on uint8 images (N, 1|3, H, W)."""
    from repa.encoders import load_encoder

    device = device or default_device()
    encoder = load_encoder(name, resolution, weights=weights, layer=layer, device=device)
    out = [
        encoder(batch.to(device)).float().mean(dim=1).cpu()
        for batch in tqdm(images.split(batch_size), desc=f"{name} features", disable=not progress)
    ]
    return torch.cat(out)


def _out_dir(out_dir: str | Path | None, loaded: LoadedModel | None, name: str) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if loaded is not None and loaded.run_dir is not None:
        return loaded.run_dir / "analysis" / f"{name}-{loaded.path.name}"
    return Path("analysis") / name


def _meta(loaded: LoadedModel) -> dict[str, Any]:
    return {"checkpoint": str(loaded.path), "step": loaded.info.get("step"), "ema": loaded.info.get("ema")}


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

    Returns:
        {"rows": [{layer, t, train_acc, test_acc, train_loss}], "out_dir", "meta"}.
    """
    device = device or default_device()
    loaded = _as_loaded(checkpoint, device)
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
        write_csv(rows, out / "probe.csv")
        write_json({"meta": meta, "rows": rows}, out / "probe.json")
        heatmap(rows, out / "probe.png", value="test_acc", title=f"linear probe test accuracy ({loaded.path.name})")
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


def _encoder_label(name: str, layer: int | None, resolution: int) -> str:
    return f"{name}@{resolution}/{'final' if layer is None else f'l{layer}'}"


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
        batch_size, seed, data_root, vae, device, progress, write: as in `run_probe`.
        out_dir: where `align.csv`, `align.json`, `align-<metric>.png` go.

    Returns:
        {"rows": [{layer, t, target, metric, value}], "out_dir", "meta"}.
    """
    device = device or default_device()
    loaded = _as_loaded(checkpoint, device)
    metric_list = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    if bad := [m for m in metric_list if m not in METRICS]:
        raise ValueError(f"unknown metrics {bad}; choose from {', '.join(METRICS)}")
    name, layer, resolution, weights = default_encoder(loaded, encoder, encoder_layer, encoder_resolution)
    layer_list = parse_layers(layers, loaded.info["model_kwargs"]["depth"])
    inputs = load_inputs(loaded, split, num, data_root, vae, progress=progress)
    target = encoder_features(name, inputs.images, resolution, layer, weights, device=device, progress=progress)
    feats = model_features(loaded, inputs.x, layer_list, parse_floats(times), batch_size, seed, progress)
    label = _encoder_label(name, layer, resolution)
    rows = alignment_table(feats, {label: target}, tuple(metric_list), k=k)  # type: ignore[arg-type]
    meta = {**_meta(loaded), "encoder": label, "num": len(inputs.labels), "k": k, "split": split}
    out = _out_dir(out_dir, loaded, "align")
    if write:
        write_csv(rows, out / "align.csv")
        write_json({"meta": meta, "rows": rows}, out / "align.json")
        for metric in metric_list:
            heatmap([r for r in rows if r["metric"] == metric], out / f"align-{metric}.png", value="value",
                    title=f"{metric}: {loaded.path.name} vs {label}")  # fmt: skip
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
) -> dict[str, Any]:
    """Similarity between two encoders' mean patch tokens for every pair of layers (None = final layer).

    Args:
        encoder_a, encoder_b: `repa.encoders` names.
        layers_a, layers_b: layers to compare (1-indexed; None = after the final block).
        resolution_a, resolution_b: input sides.
        source: images: `fashion-mnist:<split>`, an image folder, or an ADM `.npz` (see `source_batches`).
        num: number of images.
        metrics, k, out_dir, device, progress, write: as in `run_align`.

    Returns:
        {"rows": [{a, b, layer_a, layer_b, metric, value}], "out_dir", "meta"}; layer labels are "L04" or "final".
    """
    device = device or default_device()
    metric_list = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
    if bad := [m for m in metric_list if m not in METRICS]:
        raise ValueError(f"unknown metrics {bad}; choose from {', '.join(METRICS)}")
    batches, _ = source_batches(source, 250, num, resolution=max(resolution_a, resolution_b))
    images = torch.cat([b if isinstance(b, Tensor) else torch.from_numpy(b).permute(0, 3, 1, 2) for b in batches])

    def feats(name: str, layers: Sequence[int | None], res: int) -> dict[str, Tensor]:
        return {("final" if lay is None else f"L{lay:02d}"): encoder_features(name, images, res, lay, device=device,
                                                                             progress=progress) for lay in layers}  # fmt: skip

    fa, fb = feats(encoder_a, layers_a, resolution_a), feats(encoder_b, layers_b, resolution_b)
    rows = [
        {"a": encoder_a, "b": encoder_b, "layer_a": la, "layer_b": lb, "metric": m, "value": alignment(xa, xb, m, k)}
        for m in metric_list
        for la, xa in fa.items()
        for lb, xb in fb.items()
    ]
    meta = {"a": f"{encoder_a}@{resolution_a}", "b": f"{encoder_b}@{resolution_b}", "source": str(source),
            "num": len(images), "k": k}  # fmt: skip
    out = Path(out_dir) if out_dir else Path("analysis") / "align-encoders"
    if write:
        write_csv(rows, out / "align.csv")
        write_json({"meta": meta, "rows": rows}, out / "align.json")
        for metric in metric_list:
            heatmap([r for r in rows if r["metric"] == metric], out / f"align-{metric}.png", value="value",
                    row_key="layer_a", col_key="layer_b", title=f"{metric}: {encoder_a} vs {encoder_b}")  # fmt: skip
    return {"rows": rows, "out_dir": str(out), "meta": meta}
