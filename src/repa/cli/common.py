"""Flags shared by every command that loads a checkpoint (`repa sample`, `repa eval generate`, `repa probe`, `align`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """What a checkpoint may not say about its architecture (see `repa.convert.infer_model_kwargs`)."""
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for a width that is no registry size whose checkpoint has neither qk-norm "
                        "weights nor a config/args saying it")  # fmt: skip
    p.add_argument("--align-depth", type=int, default=None,
                   help="1-indexed block feeding the projectors, for a checkpoint with projectors whose config/args "
                        "do not say it")  # fmt: skip


def checkpoint_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`repa.loading.load_model` keyword arguments from `add_checkpoint_arguments`' flags."""
    return {"num_heads": args.num_heads, "align_depth": args.align_depth}
