"""`repa sample CKPT`: a PNG grid and an ADM-layout .npz (uint8 NHWC `arr_0`, labels `arr_1`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", help="repa checkpoint folder (runs/x/checkpoints/step_...), run folder, or official .pt"
    )
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples or ./samples)")
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--sampler", choices=["ode", "sde"], default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--heun", action="store_true")
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--guidance-high", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--vae", default=None, help="VAE (hub id or local folder) for latent-space models")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from repa.interop import load_model
    from repa.training.data import decode_pixels
    from repa.training.setup import generate, grid_labels, save_grid

    loaded = load_model(args.checkpoint, prefer_ema=not args.no_ema)
    model, info, cfg, path = loaded.model, loaded.info, loaded.cfg, loaded.path
    s = cfg.sample
    s.num_images = args.num
    if args.sampler:
        s.sampler = args.sampler
    if args.steps:
        s.num_steps = args.steps
    if args.heun:
        s.heun = True
    if args.cfg_scale is not None:
        s.cfg_scale = args.cfg_scale
    if args.guidance_high is not None:
        s.guidance_high = args.guidance_high
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    k = info["model_kwargs"]
    latent = cfg.data.space == "latent"  # official checkpoints (no repa config) are SD-VAE latent models
    shape = (k["in_channels"], k["input_size"], k["input_size"])
    labels = grid_labels(args.num, k["num_classes"])
    decode = decode_pixels
    if latent:
        from repa.data.vae import VAE

        vae = VAE.from_pretrained(args.vae or cfg.data.vae, device=str(device))
        decode = vae.decode_to_uint8
    images = []
    for start in tqdm(range(0, args.num, args.batch_size), desc="sample"):
        lab = labels[start : start + args.batch_size]
        x = generate(model, cfg, lab, shape, seed=args.seed * 1_000_003 + start)
        images.append(decode(x).cpu())
    images_u8 = torch.cat(images)
    out = Path(args.out) if args.out else (path.parent.parent / "samples" if "config" in info else Path("samples"))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{path.name}-{s.sampler}{s.num_steps}-cfg{s.cfg_scale:g}-n{args.num}-seed{args.seed}"
    save_grid(images_u8[: min(args.num, 100)], out / f"{stem}.png", nrow=min(k["num_classes"], 10))
    nhwc = images_u8.permute(0, 2, 3, 1)
    if nhwc.shape[-1] == 1:  # the ADM evaluator expects RGB
        nhwc = nhwc.expand(-1, -1, -1, 3)
    np.savez(out / f"{stem}.npz", arr_0=nhwc.contiguous().numpy(), arr_1=labels.numpy())
    print(f"[repa] wrote {out / stem}.png and .npz ({args.num} images, {tuple(nhwc.shape[1:])})")
    return 0
