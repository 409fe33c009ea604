"""`repa bench step|gpu|convergence [options]`: the benchmark suites in the repository's `benchmarks/` folder."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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
    """Import a benchmark suite. `benchmarks/` sits beside `src/`, outside the installed package: when it is not
    importable already, the source checkout holding this file (else the working directory) joins `sys.path`."""
    if importlib.util.find_spec("benchmarks") is None:
        here = Path(__file__).resolve().parents[3]  # <checkout>/src/repa/cli/bench.py
        roots = [p for p in (here, Path.cwd()) if (p / "benchmarks" / "__init__.py").is_file()]
        if not roots:
            raise FileNotFoundError("the benchmarks/ folder was not found: run `repa bench` from a source checkout")
        sys.path.insert(0, str(roots[0]))
    return importlib.import_module(module_name)


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
