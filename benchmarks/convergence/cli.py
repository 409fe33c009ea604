"""Options of `python -m benchmarks.convergence` and `repa bench convergence`, and the run they start."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from benchmarks.convergence import deferred
from benchmarks.convergence.bundle import DATA, build_bundle, read_manifest, run_from_bundle
from benchmarks.convergence.estimate import estimate
from benchmarks.convergence.jobs import run_benchmark
from benchmarks.convergence.presets import PRESETS, ROOT, Preset, parse_ablations, preset_from_dict
from benchmarks.convergence.timing import time_arms

DESCRIPTION = (
    "Convergence benchmark (issue #5): vanilla vs REPA on Fashion-MNIST, FID / linear probe / CKNNA vs training steps."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `python -m benchmarks.convergence` and `repa bench convergence`."""
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="budget (default: cpu; with --from-bundle, the bundle's)")  # fmt: skip
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the preset's, 0,1)")
    p.add_argument("--out", default=None, help="output folder (default: runs/bench-convergence-<preset>)")
    p.add_argument("--config", default=None, help="base preset for every arm (default: configs/tiny.yaml)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: the usual search)")
    p.add_argument("--ablate", action="append", default=[], metavar="KEY=V1[,V2]",
                   help="extra REPA arms: depth=1,4 | lambda=0.25,1.0 | kind=ntxent | "
                        "encoder=random-dinov2-vit-s | all (repeatable)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every arm (repeatable)")  # fmt: skip
    p.add_argument("--rows-from", metavar="CSV", default=None,
                   help="take the runs that an earlier report's results.csv holds whole as finished (e.g. "
                        "benchmarks/results/leaderboard-cpu/results.csv): continue that benchmark in a new --out")  # fmt: skip
    for name in ("steps", "eval-every", "fid-samples", "workers", "threads"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset's value")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--estimate", action="store_true", help="measure costs and project the wall time; train nothing")
    mode.add_argument("--time-steps", type=int, metavar="N", default=None,
                      help="time N training steps of every arm side by side in this process (fresh short runs, "
                           "arms interleaved over --time-rounds rounds) into <out>/step_times.json, which the "
                           "report's s/step column then uses; trains nothing else (run it on a quiet machine)")  # fmt: skip
    p.add_argument("--time-rounds", type=int, default=2, help="rounds of --time-steps (default 2)")
    mode.add_argument("--bundle", metavar="DIR", default=None,
                      help="write everything the preset needs offline (images, encoder weights in float16, config) "
                           "into the new folder DIR; trains nothing")  # fmt: skip
    p.add_argument("--from-bundle", metavar="DIR", default=None,
                   help="run from a bundle alone (no network, no other file; FID deferred: samples are packed into "
                        "<out>/deferred/ for --score-samples); with --score-samples: the FID reference images")  # fmt: skip
    mode.add_argument("--report", action="store_true",
                      help="write the report of the runs finished so far in --out (trains and evaluates nothing; "
                           "lists the runs that remain)")  # fmt: skip
    mode.add_argument("--score-samples", metavar="DIR", default=None,
                      help="score the FID of a packed deferred run (<out>/deferred/ of --from-bundle, or the files a "
                           "GPU run returned) and write the report into --out")  # fmt: skip


def resolve_preset(args: argparse.Namespace, base: Preset | None = None) -> Preset:
    """The chosen preset (`base` when no --preset is given, else cpu) with the command line's overrides (steps, eval
    interval, FID samples, workers, seeds)."""
    preset = PRESETS[args.preset] if args.preset else (base or PRESETS["cpu"])
    changes = {k: getattr(args, k) for k in ("steps", "eval_every", "fid_samples", "workers", "threads")}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in str(args.seeds).split(",") if s.strip())
    preset = dataclasses.replace(preset, **changes)
    if preset.eval_every < 1 or preset.steps < preset.eval_every or preset.workers < 1 or not preset.seeds:
        raise ValueError("need steps >= eval_every >= 1, workers >= 1 and at least one seed")
    return preset


def run(args: argparse.Namespace) -> int:
    argv = getattr(args, "argv", None)  # set by `main`; absent under `repa bench convergence`
    command = " ".join(["python -m benchmarks.convergence", *argv] if argv is not None else ["repa", *sys.argv[1:]])
    command = command.strip()
    config = args.config or str(ROOT / "configs" / "tiny.yaml")
    if args.score_samples:
        return _score(args, command)
    if args.from_bundle:
        return _from_bundle(args, command)
    preset = resolve_preset(args)
    name = args.preset or "cpu"
    if args.estimate:
        estimate(preset, config, args.overrides, args.data_root)
        return 0
    if args.bundle:
        build_bundle(preset, Path(args.bundle), config=config, overrides=args.overrides,
                     ablations=parse_ablations(args.ablate), data_root=args.data_root, command=command)  # fmt: skip
        return 0
    out = Path(args.out or f"runs/bench-convergence-{name}")
    if args.time_steps is not None:
        time_arms(preset, parse_ablations(args.ablate), out=out, config=config, overrides=args.overrides,
                  data_root=args.data_root, steps=args.time_steps, rounds=args.time_rounds)  # fmt: skip
        return 0
    run_benchmark(preset, out=out, config=config, overrides=args.overrides, ablations=parse_ablations(args.ablate),
                  data_root=args.data_root, command=command.replace(" --report", ""),
                  report_only=args.report, rows_from=Path(args.rows_from) if args.rows_from else None)  # fmt: skip
    return 0


def _from_bundle(args: argparse.Namespace, command: str) -> int:
    """`--from-bundle DIR`: the bundle's data, config and encoder; FID deferred."""
    if args.data_root or args.config or args.estimate or args.bundle:
        raise ValueError("--from-bundle takes its data and config from the bundle (no --data-root, --config, "
                         "--estimate, --bundle)")  # fmt: skip
    bundle = Path(args.from_bundle)
    manifest = read_manifest(bundle, verify=False)  # `run_from_bundle` verifies every file
    preset = resolve_preset(args, base=preset_from_dict(manifest["preset"]))
    name = args.preset or manifest["preset_name"]
    out = Path(args.out or f"runs/bench-convergence-{name}-offline")
    run_from_bundle(bundle, preset, out=out, overrides=args.overrides, ablations=parse_ablations(args.ablate),
                    command=command)  # fmt: skip
    return 0


def _score(args: argparse.Namespace, command: str) -> int:
    """`--score-samples DIR`: FID of a packed deferred run, then the report."""
    src = Path(args.score_samples)
    data_root = str(Path(args.from_bundle) / DATA) if args.from_bundle else args.data_root
    desc = json.loads((src / deferred.DESCRIPTION).read_text())
    out = Path(args.out or f"runs/bench-convergence-{desc['preset_name']}-scored")
    deferred.score(src, out, data_root=data_root, threads=args.threads, command=command)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    return run(args)
