"""Generate-then-score in one process or many (`torchrun` / `accelerate launch`): rank r samples its share of the
class-balanced labels (`balanced_labels(..., rank, world)`), runs the detector on its own images and writes them to a
shard; Fréchet statistics are all-reduced, pool features (precision/recall) and logits (IS) gathered; rank 0 joins
the shards into one ADM `.npz` (streamed, never the whole batch in memory) and scores. Shards go to the output folder,
so multi-node runs need it on a shared filesystem (or `save=False`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repa import distributed
from repa.data.npz import save_samples
from repa.data.sources import check_source
from repa.evaluation.detectors import Detector, make_detector
from repa.evaluation.inception_weights import inception_path
from repa.evaluation.metrics import FeatureStats
from repa.evaluation.pipeline import Activations, compute_activations, score_activations
from repa.evaluation.reference import ReferenceStats, reference_stats
from repa.evaluation.sampling import balanced_labels, rank_slice
from repa.fileio import write_json
from repa.generate import (
    apply_sample_overrides,
    decoder_for,
    generate_batches,
    run_latent_norm,
    sample_settings,
    sample_stem,
    to_adm_nhwc,
)
from repa.loading import load_model


def _gather_rows(local: torch.Tensor, num: int, device: torch.device) -> torch.Tensor:
    """All ranks' rows (rank order) of per-rank tensors whose lengths follow `rank_slice(num, r, world)`."""
    world = distributed.world_size()
    if world == 1:
        return local
    width = -(-num // world)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    parts = distributed.all_gather_cat(padded).cpu().split(width)
    sizes = [len(range(num)[rank_slice(num, r, world)]) for r in range(world)]
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _shard_writer(batches: Iterator[torch.Tensor], shard: Path | None, num: int) -> Iterator[torch.Tensor]:
    """Pass uint8 (B, C, H, W) batches through, writing them (RGB NHWC) into a memory-mapped `.npy` shard."""
    out, start = None, 0
    for images in batches:
        if shard is not None:
            if out is None:
                out = np.lib.format.open_memmap(shard, "w+", np.uint8, (num, *images.shape[2:], 3))
            out[start : start + len(images)] = to_adm_nhwc(images.cpu())
        start += len(images)
        yield images
    if out is not None:
        out.flush()


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
    num_heads: int | None = None,
    align_depth: int | None = None,
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
        num_heads, align_depth: what the checkpoint does not say about its architecture (`repa.loading.load_model`).

    Returns:
        Metrics (with `checkpoint`, `step`, `sample`, `samples`, `world_size`) on rank 0; {} on the other ranks.
    """
    if isinstance(reference, (str, Path)):
        check_source(reference)
    if distributed.world_size() > 1 and not torch.distributed.is_initialized():
        # the process group (gloo on CPU, NCCL on GPUs) and this rank's device
        device = distributed.make_accelerator().device
    elif distributed.world_size() > 1 or device is None:
        device = torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    rank, world = distributed.rank(), distributed.world_size()
    if num < world:
        raise ValueError(f"--num {num} is smaller than the number of processes ({world})")
    loaded = load_model(checkpoint, prefer_ema, device, num_heads=num_heads, align_depth=align_depth)
    apply_sample_overrides(loaded.cfg, sample or {})
    if isinstance(detector, str):
        if detector == "inception" and distributed.is_main():
            inception_path(inception)  # rank 0 fetches on first use while the others wait
        distributed.barrier()
        detector = make_detector(detector, device, inception, classifier)
    out = Path(out_dir) if out_dir else (loaded.run_dir / "eval" if loaded.run_dir else Path("eval"))
    stem = sample_stem(loaded.path.name, loaded.cfg, num, seed)
    out.mkdir(parents=True, exist_ok=True)
    shard = out / f"{stem}.rank{rank:03d}.npy" if save else None

    labels = balanced_labels(num, loaded.num_classes, seed, rank, world)
    first = rank_slice(num, rank, world).start
    decode = decoder_for(loaded.vae(vae), device, run_latent_norm(loaded.cfg))
    images = generate_batches(loaded.model, loaded.cfg, labels, loaded.sample_shape, seed=seed,
                              batch_size=batch_size, decode=decode, first_index=first)  # fmt: skip
    acts = compute_activations(detector, _shard_writer(images, shard, len(labels)), len(labels),
                               progress and distributed.is_main(), desc="generate+detect")  # fmt: skip
    stats = {  # Fréchet statistics: sums over ranks
        key: FeatureStats.unpacked(distributed.all_reduce_sum(acts.stats[key].packed().to(device)), acts.stats[key].dim)
        for key in sorted(acts.stats)
    }
    pool = _gather_rows(torch.from_numpy(acts.pool), num, device).numpy()
    logit = _gather_rows(torch.from_numpy(acts.logits), num, device).numpy() if acts.logits is not None else None
    distributed.barrier()  # every shard is complete
    if not distributed.is_main():
        return {}
    samples_path = None
    if save:
        samples_path = out / f"{stem}.npz"
        shards = [out / f"{stem}.rank{r:03d}.npy" for r in range(world)]
        parts = [np.load(sh, mmap_mode="r") for sh in shards]
        save_samples(samples_path, parts, balanced_labels(num, loaded.num_classes, seed).numpy())
        del parts
        for sh in shards:
            sh.unlink()
    ref = reference if isinstance(reference, ReferenceStats) else reference_stats(
        reference, detector, limit=ref_limit, progress=progress
    )  # fmt: skip
    metrics: dict[str, Any] = score_activations(
        Activations(pool, logit, stats, is_missing_reason=acts.is_missing_reason), ref
    )
    metrics.update(
        detector=detector.name,
        checkpoint=str(loaded.path),
        step=loaded.info.get("step"),
        ema=loaded.info.get("ema"),
        sample=sample_settings(loaded.cfg),
        seed=seed,
        reference=str(reference) if not isinstance(reference, ReferenceStats) else "stats",
        samples=str(samples_path) if samples_path else None,
        world_size=world,
    )
    write_json(metrics, out / f"{stem}.json")
    metrics["json"] = str(out / f"{stem}.json")
    return metrics
