"""Drivers behind `repa eval`: reference statistics from any source, scoring sample batches, generate-then-score.

Sources (`source_batches`): an ADM-layout `.npz` (`arr_0` uint8 NHWC), a folder of images (recursively; sizes must
agree unless `resolution` asks for the ADM centre crop), or `fashion-mnist:<split>` (the IDX files found by
`repa.data.fashion_mnist`). A reference may also be a statistics file written by `save_reference` (`repa eval ref`).

`generate_and_score` works in one process and under `torchrun` / `accelerate launch`: rank r samples its share of the
class-balanced labels (`balanced_labels(..., rank, world)`), runs the detector on its own images and writes them to a
shard; Fréchet statistics are all-reduced, pool features (precision/recall) and logits (IS) gathered; rank 0 joins
the shards into one ADM `.npz` (streamed, never the whole batch in memory) and scores. Shards go to the output folder,
so multi-node runs need it on a shared filesystem (or `save=False`).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from repa.evaluation.detectors import Detector, EncoderDetector, InceptionDetector, cache_dir, inception_path
from repa.evaluation.metrics import FeatureStats
from repa.evaluation.npz import image_batches, npz_keys, num_images, save_samples
from repa.evaluation.pipeline import (
    Activations,
    ReferenceStats,
    compute_activations,
    reference_statistics,
    score_activations,
    to_nchw_uint8,
)
from repa.evaluation.sampling import balanced_labels, rank_slice
from repa.interop import LoadedModel, load_model, resolve_checkpoint  # noqa: F401 (re-exported)

FASHION_MNIST = "fashion-mnist:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------ detectors, sources


def make_detector(
    name: str = "inception",
    device: str | torch.device = "cpu",
    inception: str | Path | None = None,
    classifier: str | None = "auto",
    resolution: int = 224,
) -> Detector:
    """A detector by name: "inception" (the FID network) or "encoder:<registry name>" (mean patch tokens).

    Args:
        name: "inception" or e.g. "encoder:dinov2-vit-l" (FD_DINOv2-style; see `EncoderDetector`).
        device: where it runs.
        inception: explicit TorchScript archive (None = the verified default, fetched on first use).
        classifier: Inception softmax matrix source ("auto", a file, or None for no Inception Score).
        resolution: input side for encoder detectors.
    """
    if name == "inception":
        return InceptionDetector(inception, classifier=classifier, device=device)
    if name.startswith("encoder:"):
        return EncoderDetector(name.split(":", 1)[1], resolution=resolution, device=device)
    raise ValueError(f"unknown detector {name!r}: use 'inception' or 'encoder:<encoder name>'")


def _fashion_split(source: str) -> str:
    split = source[len(FASHION_MNIST) :]
    if split not in ("train", "test"):
        raise ValueError(f"{source!r}: use fashion-mnist:train or fashion-mnist:test")
    return split


def fashion_mnist_images(
    split: str, limit: int | None = None, root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST uint8 (N, 1, 28, 28) and labels; with `limit`, the first limit // 10 items of each class.

    `root` is searched first (then the places `repa.data.fashion_mnist` knows)."""
    from repa.data.fashion_mnist import load_fashion_mnist
    from repa.training.data import balanced_subset

    images, labels = load_fashion_mnist(split, root=root)  # type: ignore[arg-type]
    keep = balanced_subset(labels, limit, 10)
    return images[keep][:, None].contiguous(), labels[keep]


def _folder_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


def _folder_batches(files: list[Path], batch_size: int, resolution: int | None) -> Iterator[np.ndarray]:
    from PIL import Image

    from repa.data.folder import center_crop_arr, to_rgb

    size = None
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            with Image.open(path) as img:
                rgb = to_rgb(img)
                arr = center_crop_arr(rgb, resolution) if resolution else np.asarray(rgb)
            if size is None:
                size = arr.shape
            elif arr.shape != size:
                raise ValueError(f"{path} is {arr.shape[:2]}, the first image {size[:2]}: pass a resolution to crop")
            batch.append(arr)
        yield np.stack(batch)


def source_batches(
    source: str | Path, batch_size: int = 250, limit: int | None = None, resolution: int | None = None
) -> tuple[Iterator[np.ndarray | torch.Tensor], int]:
    """uint8 image batches (numpy NHWC or torch NCHW) of a source, and how many images they hold.

    Args:
        source: ADM `.npz`, image folder, or `fashion-mnist:train|test`.
        batch_size: images per batch.
        limit: at most this many images (Fashion-MNIST: a class-balanced first-N subset; others: the first N).
        resolution: folders only: ADM centre crop to this side (None: images used as they are).
    """
    text = str(source)
    if text.startswith(FASHION_MNIST):
        images, _ = fashion_mnist_images(_fashion_split(text), limit)
        return iter(images.split(batch_size)), len(images)
    path = Path(source)
    if path.is_dir():
        files = _folder_files(path)[:limit]
        return _folder_batches(files, batch_size, resolution), len(files)
    if not path.is_file():
        raise FileNotFoundError(f"{source} is neither a file, a folder, nor fashion-mnist:<split>")
    total = num_images(path) if limit is None else min(limit, num_images(path))
    return image_batches(path, batch_size, limit), total


def is_stats_file(path: str | Path) -> bool:
    """True for a statistics file written by `save_reference` (not an image batch)."""
    path = Path(path)
    return path.suffix == ".npz" and path.is_file() and "mu_pool" in npz_keys(path) and "arr_0" not in npz_keys(path)


def save_reference(ref: ReferenceStats, path: str | Path, detector_name: str, source: str = "") -> None:
    """Write reference statistics (the `ReferenceStats.save` arrays) plus the detector's name and the source."""
    buf = io.BytesIO()
    ref.save(buf)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(detector=np.array(detector_name), reference=np.array(str(source)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def load_reference(path: str | Path, detector_name: str | None = None) -> ReferenceStats:
    """Read `save_reference` output; refuse statistics of another detector."""
    with np.load(path, allow_pickle=False) as data:
        stored = str(data["detector"]) if "detector" in data.files else None
    if detector_name is not None and stored is not None and stored != detector_name:
        raise ValueError(f"{path} holds statistics of detector {stored!r}, but scoring uses {detector_name!r}")
    return ReferenceStats.load(path)


def reference_stats(
    source: str | Path,
    detector: Detector,
    batch_size: int = 250,
    limit: int | None = None,
    resolution: int | None = None,
    progress: bool = True,
) -> ReferenceStats:
    """Reference statistics of any source; ADM `.npz` and Fashion-MNIST are cached per (content, detector).

    Args:
        source: statistics file, ADM `.npz` (its precomputed `mu`/`sigma` are used, as ADM does), image folder, or
            `fashion-mnist:<split>`.
        detector: the feature network.
        batch_size: images per detector call.
        limit: use at most this many reference images (see `source_batches`).
        resolution: folders: ADM centre-crop side.
        progress: tqdm bars.
    """
    text = str(source)
    if not text.startswith(FASHION_MNIST) and is_stats_file(text):
        return load_reference(text, detector.name)
    if text.startswith(FASHION_MNIST):  # write the images as an ADM .npz: the statistics cache keys on its content
        split = _fashion_split(text)
        path = cache_dir() / "eval" / f"fashion-mnist-{split}-{'all' if limit is None else limit}.npz"
        images, labels = fashion_mnist_images(split, limit)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        save_samples(tmp, images.permute(0, 2, 3, 1).numpy(), labels.numpy())
        tmp.replace(path)
        return reference_statistics(path, detector, batch_size, progress=progress)
    if Path(text).is_file() and limit is None:
        return reference_statistics(text, detector, batch_size, progress=progress)
    batches, total = source_batches(source, batch_size, limit, resolution)
    acts = compute_activations(detector, batches, total, progress)
    return ReferenceStats({k: (s.mean, s.cov) for k, s in acts.stats.items()}, acts.pool, "images")


def check_source(source: str | Path) -> None:
    """Fail early (before any sampling) when a source does not exist."""
    text = str(source)
    if text.startswith(FASHION_MNIST):
        _fashion_split(text)
    elif not Path(text).exists():
        raise FileNotFoundError(f"reference {text} does not exist (an .npz, a folder, or fashion-mnist:<split>)")


def summary_line(metrics: dict[str, Any]) -> str:
    """One line: FID, sFID, IS, precision, recall and counts (n/a for unavailable metrics)."""

    def fmt(key: str, spec: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else format(value, spec)

    return (
        f"FID {fmt('fid', '.3f')}  sFID {fmt('sfid', '.3f')}  IS {fmt('is', '.2f')}  precision {fmt('precision', '.3f')}"
        f"  recall {fmt('recall', '.3f')}  ({metrics.get('num_samples')} samples vs {metrics.get('num_reference')} "
        f"reference, {metrics.get('detector')})"
    )


def score(
    samples: str | Path,
    reference: str | Path | ReferenceStats,
    detector: Detector,
    batch_size: int = 250,
    limit: int | None = None,
    ref_limit: int | None = None,
    resolution: int | None = None,
    out_json: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a sample source (ADM `.npz`, folder) against a reference (see `reference_stats`).

    Returns:
        The `score_activations` metrics plus `detector`, `samples` and `reference`; also written to `out_json`.
    """
    ref = reference if isinstance(reference, ReferenceStats) else reference_stats(
        reference, detector, batch_size, ref_limit, resolution, progress
    )  # fmt: skip
    batches, total = source_batches(samples, batch_size, limit, resolution)
    metrics: dict[str, Any] = score_activations(compute_activations(detector, batches, total, progress), ref)
    metrics.update(detector=detector.name, samples=str(samples),
                   reference=str(reference) if not isinstance(reference, ReferenceStats) else "stats")  # fmt: skip
    if out_json is not None:
        _write_json(metrics, out_json)
    return metrics


def _write_json(obj: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ checkpoints


def apply_sample_overrides(cfg: Any, overrides: dict[str, Any]) -> None:
    """Set `cfg.sample` fields from a dict, skipping None values (unknown keys are errors)."""
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(cfg.sample, key):
            raise ValueError(f"unknown sample setting {key!r}")
        setattr(cfg.sample, key, value)
    if not 0.0 <= cfg.sample.guidance_low <= cfg.sample.guidance_high <= 1.0:
        raise ValueError("the guidance interval must satisfy 0 <= guidance_low <= guidance_high <= 1")


def pixel_decoder(loaded: LoadedModel, vae: str | None, device: torch.device):
    """x (data space) -> uint8 images: [-1, 1] pixels directly, latents through the SD-VAE."""
    from repa.training.data import decode_pixels

    if loaded.cfg.data.space != "latent":
        return decode_pixels
    from repa.data.vae import VAE

    return VAE.from_pretrained(vae or loaded.cfg.data.vae, device=str(device)).decode_to_uint8


# ------------------------------------------------------------------------------------------------ generate, then score


def _join_shards(shards: list[Path], labels: np.ndarray, path: Path) -> None:
    """Concatenate per-rank .npy image shards into one ADM `.npz` (`arr_0`, `arr_1`) without loading them whole."""
    parts = [np.load(s, mmap_mode="r") for s in shards]
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    tmp = path.with_name(path.stem + ".tmp.npz")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            for part in parts:
                for start in range(0, len(part), 1024):
                    f.write(np.ascontiguousarray(part[start : start + 1024]).tobytes())
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, labels.astype(np.int64), allow_pickle=False)
    del parts
    tmp.replace(path)


def _gather_rows(local: torch.Tensor, num: int, device: torch.device) -> torch.Tensor:
    """All ranks' rows (rank order) of per-rank tensors whose lengths follow `rank_slice(num, r, world)`."""
    from repa import distributed as D

    world = D.world_size()
    if world == 1:
        return local
    width = -(-num // world)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    parts = D.all_gather_cat(padded).cpu().split(width)
    sizes = [len(range(num)[rank_slice(num, r, world)]) for r in range(world)]
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _sample_and_detect(
    loaded: LoadedModel,
    labels: torch.Tensor,
    first_index: int,
    detector: Detector,
    decode,
    batch_size: int,
    seed: int,
    shard: Path | None,
    progress: bool,
) -> tuple[dict[str, FeatureStats], list[torch.Tensor], list[torch.Tensor]]:
    """Sample `labels` in batches (seeds keyed on the global index), run the detector, optionally write a shard."""
    from repa.training.setup import generate

    stats: dict[str, FeatureStats] = {}
    pools, logits, out = [], [], None
    bar = tqdm(total=len(labels), unit="img", desc="generate+detect", disable=not progress)
    for start in range(0, len(labels), batch_size):
        lab = labels[start : start + batch_size]
        x = generate(loaded.model, loaded.cfg, lab, loaded.sample_shape, seed=seed * 1_000_003 + first_index + start)
        images = to_nchw_uint8(decode(x))  # (B, 3, H, W): grayscale repeated, as the ADM evaluator expects RGB
        feats = detector.features(images)
        for key, value in feats.items():
            if key == "logits":
                logits.append(value.float().cpu())
                continue
            stats.setdefault(key, FeatureStats(value.shape[1])).update(value)
            if key == "pool":
                pools.append(value.float().cpu())
        if shard is not None:
            if out is None:
                out = np.lib.format.open_memmap(shard, "w+", np.uint8, (len(labels), *images.shape[2:], 3))
            out[start : start + len(lab)] = images.permute(0, 2, 3, 1).cpu().numpy()
        bar.update(len(lab))
    bar.close()
    if out is not None:
        out.flush()
    return stats, pools, logits


def generate_and_score(
    checkpoint: str | Path,
    num: int,
    reference: str | Path | ReferenceStats,
    detector: Detector | str = "inception",
    *,
    sample: dict[str, Any] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    out_dir: str | Path | None = None,
    save: bool = True,
    ref_limit: int | None = None,
    prefer_ema: bool = True,
    vae: str | None = None,
    inception: str | Path | None = None,
    classifier: str | None = "auto",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample `num` class-balanced images from a checkpoint and score them (one or many processes).

    Args:
        checkpoint: run folder, repa checkpoint folder, or official `.pt`.
        num: total number of samples over all processes (e.g. 50,000 for FID-50K).
        reference: see `reference_stats` (or precomputed ReferenceStats).
        detector: a Detector, or a name for `make_detector` (built on every rank).
        sample: overrides of `cfg.sample` (sampler, num_steps, heun, cfg_scale, guidance_low, guidance_high).
        batch_size: images per sampling batch per process.
        seed: label-shuffle and noise seed.
        out_dir: where the `.npz` and `.json` go (default `<run>/eval`, or `./eval` for official checkpoints).
        save: write the samples `.npz` (otherwise only the metrics JSON).
        ref_limit: use at most this many reference images.
        prefer_ema, vae: model weights and the VAE for latent models.
        inception, classifier: detector options when `detector` is a name.
        device: one process: where to run (default cuda when available); several: each rank's own device.
        progress: tqdm bars (rank 0).

    Returns:
        Metrics (with `checkpoint`, `step`, `sample`, `samples`, `world_size`) on rank 0; {} on the other ranks.
    """
    from repa import distributed as D

    if isinstance(reference, (str, Path)):
        check_source(reference)
    if D.world_size() > 1 and not torch.distributed.is_initialized():
        device = D.make_accelerator().device  # the process group (gloo on CPU, NCCL on GPUs) and this rank's device
    elif D.world_size() > 1 or device is None:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    device = torch.device(device)
    rank, world = D.rank(), D.world_size()
    if num < world:
        raise ValueError(f"--num {num} is smaller than the number of processes ({world})")
    loaded = load_model(checkpoint, prefer_ema, device)
    apply_sample_overrides(loaded.cfg, sample or {})
    if isinstance(detector, str):
        if detector == "inception" and D.is_main():
            inception_path(inception)  # rank 0 fetches on first use while the others wait
        D.barrier()
        detector = make_detector(detector, device, inception, classifier)
    s = loaded.cfg.sample
    out = Path(out_dir) if out_dir else (loaded.run_dir / "eval" if loaded.run_dir else Path("eval"))
    stem = f"{loaded.path.name}-{s.sampler}{s.num_steps}-cfg{s.cfg_scale:g}-n{num}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    shard = out / f"{stem}.rank{rank:03d}.npy" if save else None

    labels = balanced_labels(num, loaded.num_classes, seed, rank, world)
    first = rank_slice(num, rank, world).start
    decode = pixel_decoder(loaded, vae, device)
    stats, pools, logits = _sample_and_detect(loaded, labels, first, detector, decode, batch_size, seed, shard,
                                              progress and D.is_main())  # fmt: skip
    for key in sorted(stats):  # Fréchet statistics: sums over ranks
        stats[key] = FeatureStats.unpacked(D.all_reduce_sum(stats[key].packed().to(device)), stats[key].dim)
    pool = _gather_rows(torch.cat(pools), num, device).numpy()
    logit = _gather_rows(torch.cat(logits), num, device).numpy() if logits else None
    D.barrier()  # every shard is complete
    if not D.is_main():
        return {}
    samples_path = None
    if save:
        samples_path = out / f"{stem}.npz"
        shards = [out / f"{stem}.rank{r:03d}.npy" for r in range(world)]
        _join_shards(shards, balanced_labels(num, loaded.num_classes, seed).numpy(), samples_path)
        for sh in shards:
            sh.unlink()
    ref = reference if isinstance(reference, ReferenceStats) else reference_stats(
        reference, detector, limit=ref_limit, progress=progress
    )  # fmt: skip
    metrics: dict[str, Any] = score_activations(Activations(pool, logit, stats), ref)
    metrics.update(
        detector=detector.name,
        checkpoint=str(loaded.path),
        step=loaded.info.get("step"),
        ema=loaded.info.get("ema"),
        sample={
            k: getattr(s, k) for k in ("sampler", "num_steps", "heun", "cfg_scale", "guidance_low", "guidance_high")
        },
        seed=seed,
        reference=str(reference) if not isinstance(reference, ReferenceStats) else "stats",
        samples=str(samples_path) if samples_path else None,
        world_size=world,
    )
    _write_json(metrics, out / f"{stem}.json")
    metrics["json"] = str(out / f"{stem}.json")
    return metrics
