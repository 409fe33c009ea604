"""`repa export-vae RUN OUT`: a REPA-E run's tuned VAE as a diffusers folder (`save_pretrained`), its latent
BatchNorm's running statistics as the config's `latents_mean` / `latents_std`; `data.vae=OUT` / `repa prepare --vae OUT`
then use it."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a train.end_to_end run folder (its newest checkpoint) or one checkpoint folder")
    p.add_argument("out", help="the diffusers folder to write (AutoencoderKL.save_pretrained)")


def run(args: argparse.Namespace) -> int:
    # imported here: `repa --help` builds every subcommand's parser and should not load torch
    from repa.data.tuned_vae import export_tuned_vae
    from repa.loading import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.run)
    tuned = checkpoint / "vae.safetensors"
    if not tuned.is_file():
        raise FileNotFoundError(f"{checkpoint} holds no tuned VAE (vae.safetensors): it is not a train.end_to_end run")
    out = export_tuned_vae(tuned, args.out)
    print(f"[repa] wrote the tuned VAE of {checkpoint} to {out} (load it with data.vae={out} or --vae {out})")
    return 0
