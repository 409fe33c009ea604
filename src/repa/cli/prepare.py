"""`repa prepare SRC OUT`: an ImageNet-layout image folder -> VAE latent + encoder-target shards.

One process:            repa prepare data/imagenet/train data/imagenet256 --flip
Several GPUs / nodes:   accelerate launch -m repa.cli.main prepare ...   (or torchrun; rank r takes the shards
                        s with s % world == r; rank 0 writes manifest.json once all are done)
Rerunning the same command resumes: finished shards are skipped. The format is in `repa.data.shards`; the
pipeline is `repa.data.prepare.prepare_shards`; this module only parses the command line and loads the models.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

# `repa --help` builds every subcommand's parser, so this module imports torch and the repa library (about 4 s)
# only when the command runs: in `run` and `_init_distributed`, never at the top.


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
                   help="hub id or local folder (any diffusers AutoencoderKL: SD-VAE, SD3 / FLUX.1 16-channel, "
                        "REPA-E E2E-VAE); 'random[:tiny|small|sd|flux|flux-small|sd3|{json}]' = random init (tests)")  # fmt: skip
    p.add_argument("--latent-norm", choices=["vae", "dataset"], default="vae",
                   help="latent normalisation x = (z - shift) * scale: 'vae' = from the VAE's config (SD-VAE 0.18215, "
                        "SD3/FLUX scale and shift, per-channel latents_mean/latents_std); 'dataset' = per-channel mean "
                        "and std measured over the prepared latents (REPA-E's recipe), stored in manifest.json")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE/encoder call")
    p.add_argument("--shard-size", type=int, default=1000, help="source images per shard")
    p.add_argument("--flip", action="store_true", help="also store latents and targets of the mirrored images")
    p.add_argument("--images", action="store_true",
                   help="also store the uint8 centre crops (encoders can then run during training)")  # fmt: skip
    p.add_argument("--latent-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--target-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="corrupt images and entries named like images that are no regular file (broken links, "
                        "FIFOs, directories): stop naming the first, or skip them (listed in manifest.json)")  # fmt: skip
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-decoding processes")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on Ampere+ GPUs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--encoder-random-init", action="store_true", help=argparse.SUPPRESS)  # tests/benchmarks
    p.add_argument("--encoder-config", default=None, help=argparse.SUPPRESS)  # JSON overrides, random init only


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank) from the launcher's environment; a gloo group is enough (only barriers)."""
    from repa import distributed  # on use: see the note at the top

    distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=72))  # ranks may finish far apart
    return distributed.rank(), distributed.world_size(), distributed.local_rank()


def run(args: argparse.Namespace) -> int:
    # on use: see the note at the top
    import torch

    from repa.data.prepare import prepare_shards
    from repa.data.vae_spec import load_vae
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
        latent_norm=args.latent_norm,
        num_workers=args.workers, rank=rank, world_size=world, device=device, progress=not args.no_progress,
    )  # fmt: skip
    return 0
