"""Measure candidate REPA targets for the embedded Fashion-MNIST default: per-layer 10-NN accuracy and encoder cost.

For each candidate (the offline focus DINOv2-S at 98 and 112 px, ImageNet MobileNetV2 at 224 and 112 px, a
random-init DINOv2-S control, raw pixels), mean-pooled patch tokens of every layer (ViT blocks after the final
LayerNorm; MobileNetV2 stages) are classified by cosine 10-NN (majority vote) from a class-balanced training subset;
for some layers also the whole token grid (per-token L2-normalised, flattened), which is closer to what REPA's
per-patch alignment sees. Cost is the wall time per image of the encoder as the target cache runs it (batch 64,
truncated at the layer).

    .venv/bin/python scripts/measure_encoder_targets.py --per-class 100 --num-test 500 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from repa.data.fashion_mnist import load_fashion_mnist
from repa.encoders import load_encoder
from repa.encoders.mobilenet import MobileNetV2Encoder


def balanced(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of the first `per_class` items of each class, sorted."""
    return torch.sort(torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])).values


def knn_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor, k: int = 10):
    """Cosine k-NN majority vote (ties broken by summed similarity)."""
    sim = F.normalize(test.float(), dim=1) @ F.normalize(train.float(), dim=1).T
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(test), 10)
    votes.scatter_add_(1, train_y[idx], torch.ones_like(top) + 1e-3 * top)
    return float((votes.argmax(1) == test_y).float().mean())


@torch.no_grad()
def layer_features(enc, images: torch.Tensor, token_layers: set[int], batch: int = 100):
    """Per layer (1..L): mean-pooled patch tokens (ViT blocks through the final LayerNorm / MobileNet stages), and
    for layers in `token_layers` the flattened, per-token L2-normalised token grid (a spatially aware descriptor)."""
    pooled: list[list[torch.Tensor]] = []
    tokens: dict[int, list[torch.Tensor]] = {l: [] for l in token_layers}
    for i in range(0, len(images), batch):
        x = enc.preprocess(images[i : i + batch])
        if isinstance(enc, MobileNetV2Encoder):
            feats = []
            for stage in enc.net.features[: enc.num_stages]:
                x = stage(x)
                feats.append(x.flatten(2).transpose(1, 2))
        else:
            hs = enc.model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
            feats = [enc.model.layernorm(h)[:, enc.num_prefix :] for h in hs]
        if not pooled:
            pooled = [[] for _ in feats]
        for l, f in enumerate(feats, start=1):
            pooled[l - 1].append(f.mean(1))
            if l in tokens:
                tokens[l].append(F.normalize(f, dim=-1).flatten(1).half())
    return [torch.cat(f) for f in pooled], {l: torch.cat(t) for l, t in tokens.items()}


@torch.no_grad()
def seconds_per_image(enc, images: torch.Tensor, batch: int = 64, repeats: int = 3) -> float:
    """Median wall time per image of `enc(images[:batch])` (after one warm-up batch)."""
    x = images[:batch]
    enc(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        enc(x)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cost-layers", default="4,6,8,12", help="ViT layers whose truncated cost is timed")
    p.add_argument("--json", default=None, help="write all numbers here")
    p.add_argument("--cost-only", action="store_true", help="skip the k-NN probes, time the encoders only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    x_tr, y_tr = load_fashion_mnist("train")
    x_te, y_te = load_fashion_mnist("test")
    tr, te = balanced(y_tr, args.per_class), balanced(y_te, args.num_test // 10)
    x_tr, y_tr, x_te, y_te = x_tr[tr][:, None], y_tr[tr], x_te[te][:, None], y_te[te]
    print(f"train {len(x_tr)}, test {len(x_te)}, threads {args.threads}", flush=True)
    results: dict = {"pixels": {"knn": [knn_accuracy(x_tr.flatten(1), y_tr, x_te.flatten(1), y_te)]}}
    results["setup"] = {"train": len(x_tr), "test": len(x_te), "threads": args.threads, "k": 10}
    print(f"pixels: {results['pixels']['knn'][0]:.3f}", flush=True)

    candidates = [
        ("dinov2-vit-s-focus", 98),
        ("dinov2-vit-s-focus", 112),
        ("random-dinov2-vit-s", 98),
        ("mobilenetv2-imagenet", 224),
        ("mobilenetv2-imagenet", 112),
    ]
    cost_layers = [int(v) for v in args.cost_layers.split(",")]
    for name, res in candidates:
        key = f"{name}@{res}"
        t = time.perf_counter()
        enc = load_encoder(name, res)
        mobilenet = isinstance(enc, MobileNetV2Encoder)
        if args.cost_only:
            layers = [14, None] if mobilenet else cost_layers
            load = os.getloadavg()[0]
            cost = {str(l): seconds_per_image(load_encoder(name, res, layer=l), x_tr) for l in layers}
            results[key] = {"cost": cost, "loadavg_before": load, "loadavg_after": os.getloadavg()[0]}
            print(f"{key}: s/img {cost}; 1-min load average {load:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
            continue
        token_layers = {10, 14, 17, 19} if mobilenet else {4, 6, 8, 9, 10, 12}
        tr_p, tr_t = layer_features(enc, x_tr, token_layers)
        te_p, te_t = layer_features(enc, x_te, token_layers)
        knn = [knn_accuracy(a, y_tr, b, y_te) for a, b in zip(tr_p, te_p)]
        knn_tokens = {str(l): knn_accuracy(tr_t[l], y_tr, te_t[l], y_te) for l in sorted(token_layers)}
        entry = {"knn": knn, "knn_tokens": knn_tokens, "grid": list(enc.token_grid), "dim": enc.embed_dim}
        entry["seconds_probe"] = time.perf_counter() - t
        layers = [14, None] if mobilenet else cost_layers
        entry["cost"] = {str(l): seconds_per_image(load_encoder(name, res, layer=l), x_tr) for l in layers}
        results[key] = entry
        best = max(range(len(knn)), key=knn.__getitem__)
        print(f"{key}: grid {enc.token_grid} dim {enc.embed_dim} best pooled layer {best + 1} ({knn[best]:.3f}); "
              f"pooled per layer {' '.join(f'{a:.3f}' for a in knn)}; token-grid kNN {knn_tokens}; "
              f"s/img {entry['cost']}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
