"""Options of `python -m benchmarks.convergence` and `repa bench convergence`, and the run they start."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from benchmarks.convergence.estimate import estimate
from benchmarks.convergence.jobs import run_benchmark
from benchmarks.convergence.presets import PRESETS, ROOT, Preset, parse_ablations

DESCRIPTION = (
    "Convergence benchmark (issue #5): vanilla vs REPA on Fashion-MNIST, FID / linear probe / CKNNA vs training steps."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `python -m benchmarks.convergence` and `repa bench convergence`."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="budget (default: cpu)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the preset's, 0,1)")
    p.add_argument("--out", default=None, help="output folder (default: runs/bench-convergence-<preset>)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="base preset for every arm")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: the usual search)")
    p.add_argument("--ablate", action="append", default=[], metavar="KEY=V1[,V2]",
                   help="extra REPA arms: depth=1,4 | lambda=0.25,1.0 | kind=ntxent | "
                        "encoder=random-dinov2-vit-s | all (repeatable)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every arm (repeatable)")  # fmt: skip
    for name in ("steps", "eval-every", "fid-samples", "workers", "threads"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset's value")
    p.add_argument("--estimate", action="store_true", help="measure costs and project the wall time; train nothing")


def resolve_preset(args: argparse.Namespace) -> Preset:
    """The chosen preset with the command line's overrides (steps, eval interval, FID samples, workers, seeds)."""
    preset = PRESETS[args.preset]
    changes = {k: getattr(args, k) for k in ("steps", "eval_every", "fid_samples", "workers", "threads")}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in str(args.seeds).split(",") if s.strip())
    preset = dataclasses.replace(preset, **changes)
    if preset.eval_every < 1 or preset.steps < preset.eval_every or preset.workers < 1 or not preset.seeds:
        raise ValueError("need steps >= eval_every >= 1, workers >= 1 and at least one seed")
    return preset


def run(args: argparse.Namespace) -> int:
    preset = resolve_preset(args)
    if args.estimate:
        estimate(preset, args.config, args.overrides, args.data_root)
        return 0
    out = Path(args.out or f"runs/bench-convergence-{args.preset}")
    argv = getattr(args, "argv", None)  # set by `main`; absent under `repa bench convergence`
    command = " ".join(["python -m benchmarks.convergence", *argv] if argv is not None else ["repa", *sys.argv[1:]])
    run_benchmark(preset, out=out, config=args.config, overrides=args.overrides,
                  ablations=parse_ablations(args.ablate), data_root=args.data_root, command=command.strip())  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    return run(args)
