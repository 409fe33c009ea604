"""`repa align`: CKNNA/CKA/mutual-kNN between a model's pooled hidden states and an encoder, or two encoders; with
`--spatial` also iREPA's spatial-structure scores (LDS, CDS, RMSC) of every layer and encoder.

    repa align runs/tiny                                   # the run's REPA encoder, every layer x t
    repa align runs/tiny-vanilla --encoder dinov2-vit-s-focus --encoder-layer 8 --encoder-resolution 98
    repa align --encoder dinov2-vit-s-focus --encoder-layer 4,8,12 --encoder-b mobilenetv2-imagenet --num 500
    repa align --encoder dinov2-vit-b,mobilenetv2-imagenet --spatial   # rank target encoders, no model needed

Writes `align.csv`, `align.json` and one heat map per metric `align-<metric>.png` (layer x t, or layer x layer);
the encoder ranking writes `spatial.csv` and `spatial.json`.
"""

from __future__ import annotations

import argparse

from repa.cli.common import checkpoint_overrides
from repa.cli.probe import add_data_arguments


def _layers(spec: str | None) -> list[int | None]:
    if spec is None or spec == "final":
        return [None]
    return [None if v == "final" else int(v) for v in spec.split(",") if v.strip()]


def _quantile(text: str) -> float | None:
    """--outlier-quantile: a number in (0, 1], or none/off (1 is off too, as in the reference)."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        q = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'none', got {text!r}") from None
    if not 0.0 < q <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'none', got {text!r}")
    return None if q == 1.0 else q


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None, help="run folder, checkpoint, or official .pt")
    p.add_argument("--encoder", default=None,
                   help="target encoder (default: the run's REPA encoder); with --spatial alone: A,B,... to rank")  # fmt: skip
    p.add_argument("--encoder-layer", default=None,
                   help="1-indexed block or 'final' (default: the run's, else final); encoder-vs-encoder: a list")  # fmt: skip
    p.add_argument("--encoder-resolution", type=int, default=None, help="default: the run's, else 224")
    p.add_argument("--encoder-b", default=None, help="second encoder: compare two encoders (no checkpoint)")
    p.add_argument("--encoder-b-layer", default=None, help="layers of the second encoder ('final' or a list)")
    p.add_argument("--encoder-b-resolution", type=int, default=None, help="default: 224")
    p.add_argument("--source", default="fashion-mnist:test",
                   help="images for encoder-vs-encoder: fashion-mnist:<split>, folder or ADM .npz")  # fmt: skip
    p.add_argument("--num", type=int, default=1000, help="number of images (class-balanced where labels exist)")
    p.add_argument("--metric", default="cknna", help="comma-separated: cknna, cka, unbiased_cka, mutual_knn")
    p.add_argument("--k", type=int, default=10, help="neighbours for CKNNA / mutual k-NN")
    p.add_argument("--outlier-quantile", type=_quantile, default=0.95, metavar="Q",
                   help="clamp each feature set to the Q-quantile of |x| before the metric, as the platonic-rep "
                        "pipeline does (default 0.95); 'none' (or 1) = no clamp. Recorded in align.json")  # fmt: skip
    p.add_argument("--spatial", action="store_true",
                   help="also iREPA's spatial-structure scores (LDS, CDS, RMSC) of each layer x t and of the encoder(s); "
                        "with --encoder A[,B,...] alone (no checkpoint, no --encoder-b): rank encoders by them")  # fmt: skip
    p.add_argument("--split", default="test", choices=["train", "test"], help="Fashion-MNIST split")
    add_data_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from repa.analysis.run import run_align, run_align_encoders
    from repa.analysis.structure import run_rank_encoders

    device = torch.device(args.device) if args.device else None
    if args.spatial and args.checkpoint is None and args.encoder_b is None and args.encoder is not None:
        names = [n.strip() for n in args.encoder.split(",") if n.strip()]
        result = run_rank_encoders(names, _layers(args.encoder_layer), args.encoder_resolution or 224,
                                   args.data_root or args.source, args.num, args.out, device,
                                   progress=not args.no_progress)  # fmt: skip
        for rank, r in enumerate(result["rows"], 1):
            print(f"[repa] {rank}. {r['encoder']}@{r['resolution']}:{r['layer']}  "
                  f"lds {r['lds']:.4f}  cds {r['cds']:.4f}  rmsc {r['rmsc']:.4f}")  # fmt: skip
        print(f"[repa] ({result['meta']['num']} images, ranked by LDS) -> {result['out_dir']}/spatial.{{csv,json}}")
        return 0
    if args.encoder_b is not None:
        if args.checkpoint is not None or args.encoder is None:
            raise ValueError("encoder vs encoder: give --encoder A --encoder-b B and no checkpoint")
        result = run_align_encoders(
            args.encoder, args.encoder_b, _layers(args.encoder_layer), _layers(args.encoder_b_layer),
            args.encoder_resolution or 224, args.encoder_b_resolution or 224, args.data_root or args.source, args.num,
            args.metric, args.k, args.out, device, progress=not args.no_progress,
            outlier_quantile=args.outlier_quantile, spatial=args.spatial,
        )  # fmt: skip
        for r in result["rows"]:
            print(f"[repa] {r['metric']} {r['a']}:{r['layer_a']} vs {r['b']}:{r['layer_b']} = {r['value']:.4f}")
        for r in result.get("spatial", []):
            print(f"[repa] spatial {r['encoder']}:{r['layer']}  lds {r['lds']:.4f}  cds {r['cds']:.4f}  "
                  f"rmsc {r['rmsc']:.4f}")  # fmt: skip
        print(f"[repa] -> {result['out_dir']}/align.{{csv,json}} and heat maps")
        return 0
    if args.checkpoint is None:
        raise ValueError("give a checkpoint (model vs encoder) or --encoder A --encoder-b B (encoder vs encoder)")
    result = run_align(
        args.checkpoint, args.encoder, args.encoder_layer, args.encoder_resolution, args.layers, args.times, args.num,
        args.metric, args.k, args.split, args.batch_size, args.seed, args.out, args.data_root, args.vae, device,
        progress=not args.no_progress, outlier_quantile=args.outlier_quantile, spatial=args.spatial,
        **checkpoint_overrides(args),
    )  # fmt: skip
    m = result["meta"]
    for metric in dict.fromkeys(r["metric"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["metric"] == metric and r["value"] == r["value"]]  # NaN: grid too small
        best = max(rows, key=lambda r: r["value"], default=None)
        of = f"vs {m['encoder']}" if metric not in m.get("target_spatial", {}) else "of the layers"
        where = f"max {best['value']:.4f} at layer {best['layer']}, t={best['t']:g}" if best else "n/a (grid too small)"
        ref = f" ({m['encoder']}: {m['target_spatial'][metric]:.4f})" if metric in m.get("target_spatial", {}) else ""
        print(f"[repa] {metric} {of}: {where}{ref}")
    print(f"[repa] ({m['num']} images) -> {result['out_dir']}/align.{{csv,json}} and heat maps")
    return 0
