"""The `repa` command: a thin dispatcher over subcommand modules in repa.cli."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module under repa.cli; each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("repa.cli.train", "train a SiT/DiT with or without REPA from a YAML preset"),
    "sample": ("repa.cli.sample", "sample a checkpoint to a PNG grid and an ADM-layout .npz"),
    "eval": ("repa.cli.eval", "FID/sFID/IS/precision/recall: reference stats, score, generate-then-score"),
    "probe": ("repa.cli.probe", "linear probing of hidden states per layer and noise level"),
    "align": ("repa.cli.align", "CKNNA/CKA/mutual-kNN between model layers and encoders"),
    "prepare": ("repa.cli.prepare", "image folder -> VAE latents and encoder-target shards"),
    "bench": ("repa.cli.bench", "speed, memory and convergence benchmarks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repa", description="Representation Alignment for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # subcommand not available in this build
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:  # user mistakes: one clear line, no traceback
        if "REPA_DEBUG" in __import__("os").environ:
            raise
        print(f"repa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
