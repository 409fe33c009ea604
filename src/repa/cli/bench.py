"""`repa bench step|gpu [options]`: the training-step benchmarks in the repository's `benchmarks/` folder."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

SUITES: dict[str, tuple[str, str]] = {
    "step": ("benchmarks.step", "training step on CPU (or GPU): official-like vs ours, interleaved; table + JSON"),
    "gpu": ("benchmarks.gpu_step", "GPU sweep: SiT-B/2 and SiT-XL/2, bf16, cached/online targets, eager/compiled"),
    "convergence": (
        "benchmarks.convergence",
        "vanilla vs REPA on Fashion-MNIST: FID / linear probe / CKNNA vs steps, seed-spread verdicts",
    ),
}


def _suite(module_name: str) -> ModuleType:
    """Import a benchmark module from the source checkout (benchmarks/ sits beside src/, outside the package)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name not in ("benchmarks", module_name):
            raise
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):  # <repo>/src/repa/cli/bench.py, then the cwd
        if (root / "benchmarks" / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            return importlib.import_module(module_name)
    raise FileNotFoundError("the benchmarks/ folder was not found: run `repa bench` from a source checkout of repa")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The suite name and its options (parsed by the suite itself, so `repa --help` imports no benchmark code)."""
    p.add_argument("suite", choices=sorted(SUITES), help="; ".join(f"{k}: {v[1]}" for k, v in SUITES.items()))
    p.add_argument("suite_args", nargs=argparse.REMAINDER, help="the suite's options (`repa bench step --help`)")


def run(args: argparse.Namespace) -> int:
    """Parse the suite's options with its own parser and run it."""
    module = _suite(SUITES[args.suite][0])
    parser = argparse.ArgumentParser(prog=f"repa bench {args.suite}", description=SUITES[args.suite][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.suite_args)) or 0)
