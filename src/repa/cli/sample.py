"""`repa sample CKPT`: a PNG grid and an ADM-layout .npz (uint8 NHWC `arr_0`, labels `arr_1`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from repa.cli.common import add_checkpoint_arguments, checkpoint_overrides


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The sampler flags `repa sample` and `repa eval generate` share (unset flags keep the run's `sample` config)."""
    p.add_argument("--sampler", choices=["ode", "sde", "dopri5", "ddim"], default=None,
                   help="flow models: ode (Euler/Heun), sde (Euler-Maruyama), dopri5 (adaptive; needs torchdiffeq); "
                        "DDPM models (DiT): sde/ode = ancestral, ddim")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="sampler steps (dopri5: unused, adaptive)")
    p.add_argument("--heun", action="store_true", default=None, help="ODE: Heun's second-order steps")
    p.add_argument("--atol", type=float, default=None, help="dopri5 absolute tolerance (default 1e-6, SiT's)")
    p.add_argument("--rtol", type=float, default=None, help="dopri5 relative tolerance (default 1e-3, SiT's)")
    p.add_argument("--ddim-eta", type=float, default=None, help="DDIM noise scale: 0 deterministic (default), 1 DDPM")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--guidance-low", type=float, default=None, help="guidance applies for t in [low, high]")
    p.add_argument("--guidance-high", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--vae", default=None, help="VAE (hub id or folder) for latent-space models")


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`cfg.sample` overrides from the shared flags (for `repa.generate.apply_sample_overrides`)."""
    return dict(sampler=args.sampler, num_steps=args.steps, heun=args.heun, cfg_scale=args.cfg_scale,
                guidance_low=args.guidance_low, guidance_high=args.guidance_high, atol=args.atol, rtol=args.rtol,
                ddim_eta=args.ddim_eta)  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", help="repa checkpoint folder (runs/x/checkpoints/step_...), run folder, or official .pt"
    )
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples or ./samples)")
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--batch-size", type=int, default=64)
    add_sampling_arguments(p)
    add_checkpoint_arguments(p)


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top: `repa --help` builds every subcommand's parser and should not load torch
    import torch

    from repa.config.validate import check_sampler
    from repa.generate import (
        apply_sample_overrides,
        decoder_for,
        generate_batches,
        grid_labels,
        run_latent_norm,
        sample_stem,
        write_samples,
    )
    from repa.loading import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.checkpoint, prefer_ema=not args.no_ema, device=device, **checkpoint_overrides(args))
    apply_sample_overrides(loaded.cfg, {**sampling_overrides(args), "num_images": args.num})
    # before the VAE loads: ddim samples DDPM models only, dopri5 flow models only (ConfigError naming the keys)
    check_sampler(loaded.cfg, loaded.cfg.transport.diffusion == "ddpm" or getattr(loaded.model, "learn_sigma", False))
    labels = grid_labels(args.num, loaded.num_classes)
    batches = generate_batches(loaded.model, loaded.cfg, labels, loaded.sample_shape, seed=args.seed,
                               batch_size=args.batch_size, decode=decoder_for(loaded.vae(args.vae), device, run_latent_norm(loaded.cfg)),
                               progress=True)  # fmt: skip
    images = torch.cat([b.cpu() for b in batches])
    out = Path(args.out) if args.out else (loaded.run_dir / "samples" if loaded.run_dir else Path("samples"))
    stem = out / sample_stem(loaded.path.name, loaded.cfg, args.num, args.seed)
    write_samples(images, labels, stem, nrow=min(loaded.num_classes, 10))
    print(f"[repa] wrote {stem}.png and .npz ({args.num} images, {(*images.shape[2:], 3)})")
    return 0
