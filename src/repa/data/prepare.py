"""The `repa prepare` pipeline: decode in DataLoader workers, encode in batches, write latent shards shard by shard."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from repa import distributed
from repa.data.folder import CorruptImageError, find_images, load_image
from repa.data.shard_writer import (
    check_plan,
    encoder_entry,
    plan_hash,
    run_config,
    shard_done,
    shard_plan,
    to_storage,
    write_manifest,
    write_shard,
)
from repa.data.vae import from_uint8

StorageDtype = Literal["float32", "float16"]


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
    latent_norm: Literal["vae", "dataset"] = "vae",
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
        vae: a `repa.data.vae.VAE` (`encode_moments`, `norm`, `source`, `downsample`, `latent_channels`).
        encoders: frozen `repa.encoders.Encoder`s whose targets are stored (none: latents only).
        resolution: ADM centre-crop side.
        shard_size: source files per shard (K).
        batch_size: images per VAE/encoder call; batches never straddle shards, so a shard's bytes do not
            depend on which shards were done before or on the number of processes.
        flip: also store the latents and targets of the mirrored images.
        images: also store the uint8 centre crops (R x R x 3 bytes each; flipped on read), so encoders can run
            during training instead of (or besides) stored targets.
        latent_dtype, target_dtype: storage dtypes, "float32" or "float16".
        on_error: "raise" (CorruptImageError naming the file) or "skip" (left out, listed in the manifest); this
            covers corrupt files and entries named like images that are no regular file (broken symbolic links,
            FIFOs, directories named `x.png`), which are refused without being opened.
        latent_norm: "vae" (the normalisation the VAE's config implies: SD-VAE 0.18215; SD3 / FLUX scale and
            shift; per-channel `latents_mean` / `latents_std`) or "dataset" (per-channel mean and std measured
            over the prepared latents when the manifest is written; stored in it).
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
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    barrier = barrier or distributed.barrier
    source, out = Path(source), Path(out)
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    samples, classes = find_images(source)
    plan = shard_plan(source, samples, classes, run_config(vae, encoders, resolution, flip, latent_dtype,
                                                           target_dtype, images, latent_norm), shard_size)  # fmt: skip
    _agree_on_plan(out, plan, rank, barrier)
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
    skipped = manifest["skipped"]
    print(f"[repa] prepare: {manifest['num_items']} items in {manifest['num_shards']} shards -> {out}"
          + (f" ({skipped['count']} corrupt or unreadable files skipped, e.g. {skipped['files'][0]}; listed in "
             "manifest.json)" if skipped["count"] else ""), flush=True)  # fmt: skip
    if manifest["latent_norm"]["source"] == "dataset":
        norm = manifest["latent_norm"]
        print(f"[repa] prepare: per-channel latent mean {[round(v, 4) for v in norm['mean']]}, "
              f"std {[round(v, 4) for v in norm['std']]} (stored in manifest.json)", flush=True)  # fmt: skip
    return manifest


def _agree_on_plan(out: Path, plan: dict[str, Any], rank: int, barrier: Callable[[], None]) -> None:
    """Rank 0 writes (or checks) `prepare.json`; after the barrier every other rank checks it against its own plan."""
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


class SourceImages:
    """Map-style dataset of ADM-centre-cropped uint8 images (3, R, R) for a DataLoader; a corrupt file yields
    zeros and its error message (the consumer raises or skips, so the policy lives in one process)."""

    def __init__(self, samples: list[tuple[Path, int]], resolution: int) -> None:
        self.samples, self.resolution = samples, resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        error = ""
        try:
            image = torch.from_numpy(np.array(load_image(path, self.resolution))).permute(2, 0, 1)
        except CorruptImageError as e:
            image = torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8)
            error = str(e).split(f"{path}: ", 1)[-1]
        return {"image": image, "y": label, "index": index, "error": error}


def encode_images(
    images: torch.Tensor, vae: Any, encoders: Sequence[Any], flip: bool, device: Any
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
    """Posterior moments, encoder tokens and global tokens of uint8 images (B, 3, R, R) and, with `flip`, of their
    mirror images.

    Returns:
        mean, std (B, F, C, h, w) float32, one (B, F, N, D) float32 tensor per encoder, and per encoder its global
        tokens (B, F, D) (REG's class token, `Encoder.encode`; None for an encoder without `encode`), on the CPU.
    """
    with torch.no_grad():
        images = images.to(device, non_blocking=True)
        views = [images, images.flip(-1)] if flip else [images]
        means, stds = [], []
        tokens: list[list[torch.Tensor]] = [[] for _ in encoders]
        globs: list[list[torch.Tensor]] = [[] for _ in encoders]
        for view in views:
            mean, std = vae.encode_moments(from_uint8(view))
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
            for k, enc in enumerate(encoders):
                if encoder_entry(enc).get("global_token"):  # one forward: the tokens equal enc(view)
                    out = enc.encode(view, global_token=True)
                    tokens[k].append(out.tokens.float().cpu())
                    globs[k].append(out.global_token.float().cpu())
                else:
                    tokens[k].append(enc(view).float().cpu())
    stacked = [torch.stack(g, 1) if g else None for g in globs]
    return torch.stack(means, 1), torch.stack(stds, 1), [torch.stack(t, 1) for t in tokens], stacked


class _Encoding:
    """One rank's work: decode (DataLoader workers), encode (VAE + encoders), write shard after shard."""

    def __init__(
        self,
        source: Path,
        out: Path,
        samples: list[tuple[Path, int]],
        plan: dict[str, Any],
        vae: Any,
        encoders: list[Any],
        device: torch.device,
        on_error: Literal["raise", "skip"],
    ) -> None:
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

    def run(
        self,
        shards: list[int],
        batch_size: int,
        num_workers: int,
        progress: bool,
        desc: str,
        on_shard_done: Callable[[int], None] | None,
    ) -> None:
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

    def _corrupt(self, batch: dict[str, Any], ok: torch.Tensor) -> list[str]:
        """Raise for the first corrupt file of the batch, or return their paths relative to the source."""
        bad = (~ok).nonzero().flatten().tolist()
        if bad and self.on_error == "raise":
            raise CorruptImageError(self.samples[int(batch["index"][bad[0]])][0], batch["error"][bad[0]])
        return [self.samples[int(batch["index"][i])][0].relative_to(self.source).as_posix() for i in bad]

    def _encode(self, batch: dict[str, Any], ok: torch.Tensor) -> dict[str, Any]:
        """Encoded items of the batch, cast to the storage dtypes right away (a shard is held in memory)."""
        cfg = self.plan["config"]
        mean, std, tokens, globs = encode_images(batch["image"][ok], self.vae, self.encoders, self.flip, self.device)
        part = {
            "mean": to_storage(mean, cfg["latent_dtype"], "latent means"),
            "std": to_storage(std, cfg["latent_dtype"], "latent stds"),
            "tokens": [to_storage(t, cfg["target_dtype"], f"{e.name} targets") for t, e in zip(tokens, self.encoders)],
            "global_tokens": [
                None if g is None else to_storage(g, cfg["target_dtype"], f"{e.name} global tokens")
                for g, e in zip(globs, self.encoders)
            ],
            "labels": batch["y"][ok],
            "file_index": batch["index"][ok],
        }
        if cfg["images"]:
            part["images"] = batch["image"][ok]
        return part
