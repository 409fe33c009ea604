"""`repa prepare SRC OUT`: an ImageNet-layout image folder -> SD-VAE latent + encoder-target shards.

One process:            repa prepare data/imagenet/train data/imagenet256 --flip
Several GPUs / nodes:   accelerate launch -m repa.cli.main prepare ...   (or torchrun; rank r takes the shards
                        s with s % world == r; rank 0 writes manifest.json once all are done)
Rerunning the same command resumes: finished shards are skipped. The format is in `repa.data.shards`; the
pipeline (`prepare_shards`) is here: decode in DataLoader workers, encode in batches, write shard by shard.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

StorageDtype = Literal["float32", "float16"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="image folder in ImageNet layout: SRC/<class>/<image>")
    p.add_argument("out", help="output folder (rerunning into it resumes)")
    p.add_argument("--resolution", type=int, default=256, help="ADM centre-crop side (latents are resolution/8)")
    p.add_argument("--encoders", nargs="*", default=["dinov2-vit-b"],
                   help="target encoders (repa.encoders names, space or comma separated); 'none' = latents only")  # fmt: skip
    p.add_argument("--encoder-resolution", type=int, default=224, help="encoder input side (224; 448 for 512 px)")
    p.add_argument("--encoder-layer", type=int, default=None, help="encoder block (default: the last, after its norm)")
    p.add_argument("--encoder-weights", nargs="*", default=None, help="local weights, one per encoder")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="hub id or local folder; 'random[:tiny|small|sd|{json}]' = random init (tests)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE/encoder call")
    p.add_argument("--shard-size", type=int, default=1000, help="source images per shard")
    p.add_argument("--flip", action="store_true", help="also store latents and targets of the mirrored images")
    p.add_argument("--images", action="store_true",
                   help="also store the uint8 centre crops (encoders can then run during training)")  # fmt: skip
    p.add_argument("--latent-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--target-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="corrupt images: stop naming the file, or skip them (listed in manifest.json)")  # fmt: skip
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-decoding processes")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on Ampere+ GPUs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--encoder-random-init", action="store_true", help=argparse.SUPPRESS)  # tests/benchmarks
    p.add_argument("--encoder-config", default=None, help=argparse.SUPPRESS)  # JSON overrides, random init only


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank) from the launcher's environment; a gloo group is enough (only barriers)."""
    import datetime

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=72))  # ranks may finish far apart
    return rank, world, local


def run(args: argparse.Namespace) -> int:
    import torch

    from repa.data.vae import load_vae
    from repa.encoders import load_encoder

    rank, world, local = _init_distributed()
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    names = [n for v in args.encoders for n in v.split(",") if n and n != "none"]
    weights = args.encoder_weights or [None] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"--encoder-weights needs one path per encoder ({len(names)}), got {len(weights)}")
    overrides = json.loads(args.encoder_config) if args.encoder_config else None
    encoders = [
        load_encoder(n, args.encoder_resolution, weights=w, layer=args.encoder_layer, device=device,
                     random_init=args.encoder_random_init, config_overrides=overrides)
        for n, w in zip(names, weights)
    ]  # fmt: skip
    prepare_shards(
        args.source, args.out, vae=load_vae(args.vae, device), encoders=encoders, resolution=args.resolution,
        shard_size=args.shard_size, batch_size=args.batch_size, flip=args.flip, images=args.images,
        latent_dtype=args.latent_dtype, target_dtype=args.target_dtype, on_error=args.on_error,
        num_workers=args.workers, rank=rank, world_size=world, device=device, progress=not args.no_progress,
    )  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------------- pipeline


def prepare_shards(
    source: str | Path,
    out: str | Path,
    *,
    vae: Any,
    encoders: Sequence[Any] = (),
    resolution: int = 256,
    shard_size: int = 1000,
    batch_size: int = 64,
    flip: bool = False,
    images: bool = False,
    latent_dtype: StorageDtype = "float32",
    target_dtype: StorageDtype = "float16",
    on_error: Literal["raise", "skip"] = "raise",
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: Any = None,
    progress: bool = True,
    barrier: Callable[[], None] | None = None,
    on_shard_done: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:
    """Encode an ImageNet-layout folder into latent + target shards under `out` (resumable, multi-process).

    Args:
        source: folder of class subfolders.
        out: output folder (created); rerunning into it resumes and must use the same settings.
        vae: a `repa.data.vae.VAE` (`encode_moments`, `scale`, `source`, `downsample`, `latent_channels`).
        encoders: frozen `repa.encoders.Encoder`s whose targets are stored (none: latents only).
        resolution: ADM centre-crop side.
        shard_size: source files per shard (K).
        batch_size: images per VAE/encoder call; batches never straddle shards, so a shard's bytes do not
            depend on which shards were done before or on the number of processes.
        flip: also store the latents and targets of the mirrored images.
        images: also store the uint8 centre crops (R x R x 3 bytes each; flipped on read), so encoders can run
            during training instead of (or besides) stored targets.
        latent_dtype, target_dtype: storage dtypes, "float32" or "float16".
        on_error: "raise" (CorruptImageError naming the file) or "skip" (left out, listed in the manifest).
        num_workers: DataLoader processes decoding images.
        rank, world_size: this process takes shards s with s % world_size == rank.
        device: where the VAE and encoders run (default: the VAE's device).
        progress: tqdm bar (rank 0).
        barrier: called after rank 0 wrote the plan and before it writes the manifest (default
            `repa.distributed.barrier`, a no-op in one process).
        on_shard_done: called with each shard index written (progress hook; tests raise from it).

    Returns:
        the manifest on rank 0, None elsewhere.
    """
    import torch

    from repa import distributed as D
    from repa.data.folder import find_images
    from repa.data.shards import check_plan, plan_hash, run_config, shard_done, shard_plan, write_manifest

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    barrier = barrier or D.barrier
    source, out = Path(source), Path(out)
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    samples, classes = find_images(source)
    plan = shard_plan(source, samples, classes, run_config(vae, encoders, resolution, flip, latent_dtype,
                                                           target_dtype, images), shard_size)  # fmt: skip
    error = None
    if rank == 0:
        try:
            check_plan(out, plan, rank)
        except (ValueError, OSError) as err:  # reach the barrier anyway, so the other ranks fail too, not hang
            error = err
    barrier()
    if error is not None:
        raise error
    if rank != 0:
        check_plan(out, plan, rank)
    mine = [s for s in range(plan["num_shards"]) if s % world_size == rank]
    todo = [s for s in mine if not shard_done(out, s, plan_hash(plan))]
    if rank == 0 and len(todo) < len(mine):
        print(f"[repa] prepare: {len(mine) - len(todo)} of {len(mine)} shards already done, resuming", flush=True)
    work = _Encoding(source, out, samples, plan, vae, list(encoders), device, on_error)
    work.run(todo, batch_size, num_workers, progress and rank == 0, f"prepare {rank}/{world_size}", on_shard_done)
    barrier()
    if rank != 0:
        return None
    manifest = write_manifest(out)
    n_skip = manifest["skipped"]["count"]
    print(f"[repa] prepare: {manifest['num_items']} items in {manifest['num_shards']} shards -> {out}"
          + (f" ({n_skip} corrupt files skipped, listed in manifest.json)" if n_skip else ""), flush=True)  # fmt: skip
    return manifest


class SourceImages:
    """Map-style dataset of ADM-centre-cropped uint8 images (3, R, R) for a DataLoader; a corrupt file yields
    zeros and its error message (the consumer raises or skips, so the policy lives in one process)."""

    def __init__(self, samples: list[tuple[Path, int]], resolution: int) -> None:
        self.samples, self.resolution = samples, resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np
        import torch

        from repa.data.folder import CorruptImageError, load_image

        path, label = self.samples[index]
        error = ""
        try:
            image = torch.from_numpy(np.array(load_image(path, self.resolution))).permute(2, 0, 1)
        except CorruptImageError as e:
            image = torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8)
            error = str(e).split(f"{path}: ", 1)[-1]
        return {"image": image, "y": label, "index": index, "error": error}


def encode_images(images: Any, vae: Any, encoders: Sequence[Any], flip: bool, device: Any) -> tuple[Any, Any, list]:
    """Posterior moments and encoder tokens of uint8 images (B, 3, R, R) and, with `flip`, of their mirror images.

    Returns:
        mean, std (B, F, C, h, w) float32 and one (B, F, N, D) float32 tensor per encoder, on the CPU.
    """
    import torch

    with torch.no_grad():
        images = images.to(device, non_blocking=True)
        views = [images, images.flip(-1)] if flip else [images]
        means, stds, tokens = [], [], [[] for _ in encoders]
        for view in views:
            mean, std = vae.encode_moments(view.float() / 127.5 - 1.0)
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
            for k, enc in enumerate(encoders):
                tokens[k].append(enc(view).float().cpu())
    return torch.stack(means, 1), torch.stack(stds, 1), [torch.stack(t, 1) for t in tokens]


class _Encoding:
    """One rank's work: decode (DataLoader workers), encode (VAE + encoders), write shard after shard."""

    def __init__(self, source, out, samples, plan, vae, encoders, device, on_error) -> None:
        self.source, self.out, self.samples, self.plan = source, out, samples, plan
        self.vae, self.encoders, self.device, self.on_error = vae, encoders, device, on_error
        self.flip = len(plan["config"]["flips"]) > 1

    def batches(self, shards: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
        """(shard, file indices) per batch; a batch never straddles two shards."""
        k, n = self.plan["shard_size"], len(self.samples)
        return [
            (s, list(range(b, min(b + batch_size, (s + 1) * k, n))))
            for s in shards
            for b in range(s * k, min((s + 1) * k, n), batch_size)
        ]

    def run(self, shards, batch_size, num_workers, progress, desc, on_shard_done) -> None:
        import torch
        from tqdm.auto import tqdm

        from repa.data.shards import write_shard

        batches = self.batches(shards, batch_size)
        loader = torch.utils.data.DataLoader(
            SourceImages(self.samples, self.plan["config"]["resolution"]), batch_sampler=[b for _, b in batches],
            num_workers=num_workers, pin_memory=self.device.type == "cuda",
        )  # fmt: skip
        bar = tqdm(total=sum(len(b) for _, b in batches), desc=desc, unit="img", disable=not progress)
        parts: list[dict[str, Any]] = []
        skipped: list[str] = []
        for j, ((s, _), batch) in enumerate(zip(batches, loader)):
            ok = torch.tensor([e == "" for e in batch["error"]])
            skipped += self._corrupt(batch, ok)
            if bool(ok.any()):
                parts.append(self._encode(batch, ok))
            bar.update(len(ok))
            if j + 1 == len(batches) or batches[j + 1][0] != s:  # the last batch of shard s
                write_shard(self.out, s, self.plan, parts, skipped)
                parts, skipped = [], []
                if on_shard_done is not None:
                    on_shard_done(s)
        bar.close()

    def _corrupt(self, batch: dict[str, Any], ok: Any) -> list[str]:
        """Raise for the first corrupt file of the batch, or return their paths relative to the source."""
        from repa.data.folder import CorruptImageError

        bad = (~ok).nonzero().flatten().tolist()
        if bad and self.on_error == "raise":
            raise CorruptImageError(self.samples[int(batch["index"][bad[0]])][0], batch["error"][bad[0]])
        return [self.samples[int(batch["index"][i])][0].relative_to(self.source).as_posix() for i in bad]

    def _encode(self, batch: dict[str, Any], ok: Any) -> dict[str, Any]:
        """Encoded items of the batch, cast to the storage dtypes right away (a shard is held in memory)."""
        from repa.data.shards import to_storage

        cfg = self.plan["config"]
        mean, std, tokens = encode_images(batch["image"][ok], self.vae, self.encoders, self.flip, self.device)
        part = {
            "mean": to_storage(mean, cfg["latent_dtype"], "latent means"),
            "std": to_storage(std, cfg["latent_dtype"], "latent stds"),
            "tokens": [to_storage(t, cfg["target_dtype"], f"{e.name} targets") for t, e in zip(tokens, self.encoders)],
            "labels": batch["y"][ok],
            "file_index": batch["index"][ok],
        }
        if cfg["images"]:
            part["images"] = batch["image"][ok]
        return part
