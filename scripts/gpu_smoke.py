#!/usr/bin/env python
"""GPU smoke test (under 5 minutes on one H100): a few SiT-XL/2 + REPA steps with bf16, torch.compile and gradient
checkpointing (FSDP2 with --fsdp, as `train.fsdp=true` shards it), then CFG sampling; prints a JSON report.

    python scripts/gpu_smoke.py                                    # one GPU
    torchrun --nproc_per_node 8 scripts/gpu_smoke.py --fsdp        # FSDP over 8 GPUs (see docs/scaling.md)
    python scripts/gpu_smoke.py --tiny                              # seconds on a CPU: same code path, tiny sizes

Inputs are synthetic (random latents and images) and the DINOv2-B target encoder has random weights of the real
architecture, so nothing is downloaded; this checks that the pieces run together at scale (shapes, dtypes,
compile, memory, finiteness, throughput), not what they learn. Exit status 1 if any loss or sample is not finite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

TINY_ENCODER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model/encoder on the CPU (no compile, fp32)")
    p.add_argument("--model", default="SiT-XL/2", help="registry name (default SiT-XL/2)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (the first one includes compilation)")
    p.add_argument("--batch-size", type=int, default=32, help="per-process batch")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None, help="default bf16 (tiny: no)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="shard the model as train.fsdp=true does (FSDP2)")
    p.add_argument("--sample-steps", type=int, default=8, help="Euler ODE steps of the sampling check")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--out", default=None, help="also write the JSON report here")
    return p.parse_args(argv)


def build(args: argparse.Namespace, device):
    """(model, encoder, latent shape) for the run."""
    from repa.encoders import load_encoder
    from repa.models import build_model

    if args.tiny:
        enc = load_encoder("random-dinov2-vit-s", 28, random_init=True, config_overrides=TINY_ENCODER)
        model = build_model("SiT-T/2", input_size=8, hidden_size=64, depth=2, num_heads=2, align_depth=1,
                            encoder_dims=[enc.embed_dim], projector_dim=64, num_classes=10)  # fmt: skip
        return model, enc.to(device), (4, 8, 8), 32
    enc = load_encoder("dinov2-vit-b", 224, random_init=True)  # real architecture, random weights (offline)
    model = build_model(args.model, encoder_dims=[enc.embed_dim])
    return model, enc.to(device), (4, model.input_size, model.input_size), 256


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from accelerate import Accelerator

    from repa import distributed
    from repa.losses import RepaLoss
    from repa.samplers import euler_maruyama_sampler, euler_sampler, model_velocity_fn

    precision = args.mixed_precision or ("no" if args.tiny else "bf16")
    acc = Accelerator(mixed_precision=precision, cpu=args.tiny or not torch.cuda.is_available())
    device = acc.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the train.allow_tf32 switch
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model, encoder, shape, image_size = build(args, device)
    model.grad_checkpointing = not args.no_grad_checkpointing
    model.to(device).train()
    if args.fsdp:  # the training loop's sharding (train.fsdp); the optimizer sees the sharded parameters
        distributed.ensure_process_group()
        distributed.shard_model(model, list(model.blocks), forward_methods=("velocity", "forward_hidden"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    if not args.fsdp:
        model, opt = acc.prepare(model, opt)
    train_model = model if args.no_compile or args.tiny else torch.compile(model)
    loss_fn = RepaLoss(align_coeff=0.5)
    b, g = args.batch_size, torch.Generator().manual_seed(acc.process_index)

    times, losses = [], []
    for step in range(args.steps):
        x = torch.randn((b, *shape), generator=g).to(device)
        y = torch.randint(0, model_num_classes(model), (b,), generator=g).to(device)
        images = torch.randint(0, 256, (b, 3, image_size, image_size), generator=g, dtype=torch.uint8).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(), acc.autocast():
            targets = [encoder(images)]
        with acc.autocast():
            terms = loss_fn(train_model, x, y, targets)
        acc.backward(terms["total"])
        if args.fsdp:
            grad_norm = distributed.grad_norm(list(model.parameters()), 1.0)
        else:
            grad_norm = acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append({k: float(terms[k]) for k in ("denoise", "align", "total")} | {"grad_norm": float(grad_norm)})
        acc.print(f"[gpu_smoke] step {step}: {losses[-1]} ({times[-1]:.2f} s)")

    model.eval()  # sample through the (possibly FSDP-wrapped) module, uncompiled: batch size and mode change
    noise = torch.randn((args.num_samples, *shape), generator=g).to(device)
    labels = torch.arange(args.num_samples, device=device) % model_num_classes(model)
    start = time.perf_counter()
    with acc.autocast():
        fn = model_velocity_fn(model)
        ode = euler_sampler(fn, noise, labels, num_steps=args.sample_steps, heun=True, cfg_scale=1.8,
                            guidance_high=0.7, null_label=model_num_classes(model))  # fmt: skip
        sde = euler_maruyama_sampler(fn, noise, labels, num_steps=args.sample_steps, cfg_scale=1.8,
                                     guidance_high=0.7, null_label=model_num_classes(model),
                                     generator=torch.Generator(device=device).manual_seed(0))  # fmt: skip
    sample_s = time.perf_counter() - start
    finite = all(all(map(_finite, v.values())) for v in losses) and bool(ode.isfinite().all() & sde.isfinite().all())
    steady = times[1:] or times
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "distributed": "FSDP2" if args.fsdp else str(acc.distributed_type), "processes": acc.num_processes, "model": "tiny" if args.tiny else args.model,
        "mixed_precision": precision, "compile": train_model is not model, "grad_checkpointing": not args.no_grad_checkpointing,
        "batch_per_process": b, "first_step_s": times[0], "step_s": sum(steady) / len(steady),
        "images_per_s": b * acc.num_processes * len(steady) / sum(steady),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "sample_s": sample_s, "sample_std": [float(ode.float().std()), float(sde.float().std())],
        "losses": losses, "finite": finite,
    }  # fmt: skip
    if acc.is_main_process:
        text = json.dumps(report, indent=1)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
    acc.wait_for_everyone()
    acc.end_training()
    return 0 if finite else 1


def model_num_classes(model) -> int:
    """num_classes of a possibly wrapped model (DDP/FSDP wrappers forward unknown attributes differently)."""
    inner = getattr(model, "module", model)
    return int(getattr(inner, "num_classes", getattr(model, "num_classes", 1000)))


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


if __name__ == "__main__":
    sys.exit(main())
