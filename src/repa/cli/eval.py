"""`repa eval {ref,score,generate}`: reference statistics, scoring a sample batch, and generate-then-score.

    repa eval ref fashion-mnist:test --out fmnist-test-stats.npz
    repa eval score samples.npz --ref VIRTUAL_imagenet256_labeled.npz --json metrics.json
    repa eval generate runs/tiny --num 2000 --ref fashion-mnist:test
    accelerate launch --num_processes 8 -m repa.cli.main eval generate last.pt --num 50000 --ref ref.npz --cfg-scale 1.8

References: an ADM `.npz` (its precomputed `mu`/`sigma` are used as ADM does), a statistics file from `repa eval ref`,
an image folder, or `fashion-mnist:<split>`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from repa.cli.common import add_checkpoint_arguments, checkpoint_overrides
from repa.cli.sample import add_sampling_arguments, sampling_overrides


def _detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detector", default="inception", help="'inception' (FID) or 'encoder:<name>' (e.g. dinov2-vit-l)")
    p.add_argument("--inception", default=None, help="explicit FID Inception TorchScript archive (default: verified)")
    is_source = p.add_mutually_exclusive_group()
    is_source.add_argument("--no-is", action="store_true", help="no Inception Score (no classifier weights needed)")
    is_source.add_argument(
        "--classifier",
        default=None,
        metavar="PATH",
        help="Inception softmax weights for the IS: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth or a (2048, 1008) .npy/.safetensors (default: repa's cache, then "
        "those files in torch.hub's checkpoints folder, then one download)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per detector (ref/score) or sampling batch")
    p.add_argument("--resolution", type=int, default=None, help="image folders: ADM centre-crop side")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="{ref,score,generate}", required=True)

    ref = sub.add_parser("ref", help="reference statistics of an .npz, a folder or fashion-mnist:<split>")
    ref.add_argument("source", help="ADM .npz, image folder, or fashion-mnist:train|test")
    ref.add_argument("--out", required=True, help="statistics .npz to write")
    ref.add_argument("--num", type=int, default=None, help="at most this many images (Fashion-MNIST: class-balanced)")
    _detector_args(ref)

    score = sub.add_parser("score", help="score a sample .npz (or image folder) against a reference")
    score.add_argument("samples", help="ADM sample .npz (arr_0 uint8 NHWC) or image folder")
    score.add_argument("--ref", required=True, help="reference: .npz, stats .npz, folder, or fashion-mnist:<split>")
    score.add_argument("--json", default=None, help="metrics JSON (default: <samples>.metrics.json)")
    score.add_argument("--num", type=int, default=None, help="score only the first N samples")
    score.add_argument("--ref-num", type=int, default=None, help="use at most N reference images")
    _detector_args(score)

    gen = sub.add_parser("generate", help="sample a checkpoint with class-balanced labels, then score")
    gen.add_argument("checkpoint", help="run folder, repa checkpoint folder, or official .pt")
    gen.add_argument("--num", type=int, default=50_000, help="total samples over all processes")
    gen.add_argument("--ref", required=True, help="reference: .npz, stats .npz, folder, or fashion-mnist:<split>")
    gen.add_argument("--ref-num", type=int, default=None, help="use at most N reference images")
    gen.add_argument("--out", default=None, help="output folder (default: <run>/eval or ./eval)")
    add_sampling_arguments(gen)
    add_checkpoint_arguments(gen)
    gen.add_argument("--no-save", action="store_true", help="do not write the samples .npz (metrics JSON only)")
    _detector_args(gen)


def run(args: argparse.Namespace) -> int:
    import torch

    from repa.data.npz import check_npz_inputs
    from repa.distributed import is_main
    from repa.evaluation import make_detector, reference_stats, score, summary_line
    from repa.evaluation.generation import generate_and_score
    from repa.evaluation.reference import save_reference

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    classifier = None if args.no_is else (args.classifier or "auto")
    progress = not args.no_progress
    if args.eval_command == "generate":
        metrics = generate_and_score(
            args.checkpoint, args.num, args.ref, args.detector, sample=sampling_overrides(args), batch_size=args.batch_size or 64,
            seed=args.seed, out_dir=args.out, save=not args.no_save, ref_limit=args.ref_num,
            prefer_ema=not args.no_ema, vae=args.vae, inception=args.inception, classifier=classifier,
            device=args.device, progress=progress, **checkpoint_overrides(args),
        )  # fmt: skip
        if is_main():
            print(f"[repa] {summary_line(metrics)} -> {metrics['json']}")
        return 0
    if args.eval_command == "score":  # damaged inputs are named before any detector is built or downloaded
        check_npz_inputs(args.samples, args.ref)
    detector = make_detector(args.detector, device, args.inception, classifier)
    batch_size = args.batch_size or 250
    if args.eval_command == "ref":
        ref = reference_stats(args.source, detector, batch_size, args.num, args.resolution, progress)
        save_reference(ref, args.out, detector.name, args.source)
        print(f"[repa] reference statistics of {len(ref.pool)} images ({detector.name}, {ref.source}) -> {args.out}")
        return 0
    out_json = args.json or (
        str(Path(args.samples).with_suffix("")) + ".metrics.json" if Path(args.samples).is_file() else "metrics.json"
    )
    metrics = score(args.samples, args.ref, detector, batch_size, args.num, args.ref_num, args.resolution, out_json,
                    progress)  # fmt: skip
    print(f"[repa] {summary_line(metrics)} -> {out_json}")
    return 0
