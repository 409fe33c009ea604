"""`repa probe CKPT`: linear-probe accuracy of pooled hidden states per layer x noise level (REPA Sec. 3.2).

    repa probe runs/tiny --layers all --times 0,0.25,0.5,0.75 --num-train 2000 --num-test 1000
    repa probe SiT-XL-2-256.pt --data-root imagenet/train --test-root imagenet/val --vae stabilityai/sd-vae-ft-ema

Writes `probe.csv`, `probe.json` and a layer x t heat map `probe.png` (default folder `<run>/analysis/probe-<step>`).
"""

from __future__ import annotations

import argparse

from repa.cli.common import add_checkpoint_arguments, checkpoint_overrides


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `probe` and `align` for the model, its data and the output."""
    p.add_argument("--layers", default="all", help="'all' or comma-separated 1-indexed blocks")
    p.add_argument("--times", default="0,0.25,0.5,0.75", help="comma-separated noise levels t (0 = clean)")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--data-root", default=None, help="ImageNet-layout image folder (non-Fashion-MNIST checkpoints)")
    p.add_argument("--vae", default=None, help="SD-VAE hub id or folder for latent models (default: the run's)")
    p.add_argument("--batch-size", type=int, default=250, help="images per model forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    add_checkpoint_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run folder, repa checkpoint folder, or official .pt")
    p.add_argument("--num-train", type=int, default=2000, help="class-balanced images to fit the probe")
    p.add_argument("--num-test", type=int, default=1000, help="class-balanced images to evaluate it")
    p.add_argument("--test-root", default=None, help="image folder of the test split (default: split --data-root)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    add_data_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from repa.analysis.run import run_probe

    result = run_probe(
        args.checkpoint, args.layers, args.times, args.num_train, args.num_test, args.epochs, args.lr,
        batch_size=args.batch_size, seed=args.seed, out_dir=args.out, data_root=args.data_root,
        test_root=args.test_root, vae=args.vae, device=torch.device(args.device) if args.device else None,
        progress=not args.no_progress, **checkpoint_overrides(args),
    )  # fmt: skip
    best = max(result["rows"], key=lambda r: r["test_acc"])
    m = result["meta"]
    print(f"[repa] probe: best test accuracy {best['test_acc']:.3f} at layer {best['layer']}, t={best['t']:g} "
          f"({m['num_train']} train / {m['num_test']} test images) -> {result['out_dir']}/probe.{{csv,json,png}}")  # fmt: skip
    return 0
