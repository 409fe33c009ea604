"""`repa train-vae CONFIG OUT [section.key=value ...]`: a small AutoencoderKL trained on the config's training images
(`data.*`; `data.vae` is the starting point: `random:tiny` trains from scratch) and written as a diffusers folder
whose config carries the latents' per-channel statistics; `data.vae=OUT` then trains in its latent space."""

from __future__ import annotations

import argparse

# the `AutoencoderSettings` fields with a flag each (`--batch-size`, ...) and its help, {} = the default
_FLAGS = {"steps": "optimizer steps (default {})", "batch_size": "images per step (default {})",
          "lr": "AdamW learning rate (default {})", "kl_coeff": "KL weight (default {})", "seed": None,
          "log_every": "steps per logged mean (default {})",
          "eval_images": "Fashion-MNIST test images for the reported reconstruction (default {}; 0: none)"}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    from repa.training.autoencoder import AutoencoderSettings as defaults

    p.add_argument("config", help="YAML preset whose data section gives the images, e.g. configs/tiny-repa-e.yaml")
    p.add_argument("out", help="the diffusers folder to write (must not exist)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.vae=random:small data.num_train=6000")
    for name, text in _FLAGS.items():
        default, flag = getattr(defaults, name), f"--{name.replace('_', '-')}"
        p.add_argument(flag, type=type(default), default=default, help=text and text.format(default))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    import torch

    from repa.config import load_config
    from repa.training.autoencoder import AutoencoderSettings, train_autoencoder

    cfg = load_config(args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = AutoencoderSettings(**{name: getattr(args, name) for name in _FLAGS})
    summary = train_autoencoder(cfg, args.out, settings, progress=cfg.train.progress)
    rec = summary["test_reconstruction"] or summary["train_reconstruction"]
    print(f"[repa] wrote {args.out} ({summary['train_seconds']:.0f} s): reconstruction L1 {rec['l1']:.4f}, PSNR "
          f"{rec['psnr']:.1f} dB; train with data.vae={args.out} (reconstructions.png, train_vae.json inside)")  # fmt: skip
    return 0
