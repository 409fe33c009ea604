"""`repa train-vae CONFIG OUT [section.key=value ...]`: a small AutoencoderKL trained on the config's training images
(`data.*`; `data.vae` is the starting point: `random:tiny` trains from scratch) and written as a diffusers folder
whose config carries the latents' per-channel statistics; `data.vae=OUT` then trains in its latent space."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from repa.training.autoencoder import AutoencoderSettings as defaults

    p.add_argument("config", help="YAML preset whose data section gives the images, e.g. configs/tiny-repa-e.yaml")
    p.add_argument("out", help="the diffusers folder to write (must not exist)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.vae=random:small data.num_train=6000")
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    p.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help=f"images per step (default {defaults.batch_size})"
    )
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"AdamW learning rate (default {defaults.lr})")
    p.add_argument("--kl-coeff", type=float, default=defaults.kl_coeff, help=f"KL weight (default {defaults.kl_coeff})")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--log-every",
        type=int,
        default=defaults.log_every,
        help=f"steps per logged mean (default {defaults.log_every})",
    )
    p.add_argument("--eval-images", type=int, default=defaults.eval_images,
                   help=f"Fashion-MNIST test images for the reported reconstruction (default {defaults.eval_images}; 0: none)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    import torch

    from repa.config import load_config
    from repa.training.autoencoder import AutoencoderSettings, train_autoencoder

    cfg = load_config(args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = AutoencoderSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, kl_coeff=args.kl_coeff,
                                   seed=args.seed, log_every=args.log_every, eval_images=args.eval_images)  # fmt: skip
    summary = train_autoencoder(cfg, args.out, settings, progress=cfg.train.progress)
    rec = summary["test_reconstruction"] or summary["train_reconstruction"]
    print(f"[repa] wrote {args.out} ({summary['train_seconds']:.0f} s): reconstruction L1 {rec['l1']:.4f}, PSNR "
          f"{rec['psnr']:.1f} dB; train with data.vae={args.out} (reconstructions.png, train_vae.json inside)")  # fmt: skip
    return 0
