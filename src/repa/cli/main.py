"""The `repa` command: a thin dispatcher over subcommand modules in repa.cli; a documented fault ends in one or
two lines and its exit code (`repa.errors`), a bug in its traceback (`--debug` / `REPA_DEBUG=1`: always)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import yaml

from repa import errors

# subcommand name -> module under repa.cli; each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("repa.cli.train", "train a SiT/DiT with or without REPA from a YAML preset"),
    "sample": ("repa.cli.sample", "sample a checkpoint to a PNG grid and an ADM-layout .npz"),
    "eval": ("repa.cli.eval", "FID/sFID/IS/precision/recall: reference stats, score, generate-then-score"),
    "probe": ("repa.cli.probe", "linear probing of hidden states per layer and noise level"),
    "align": ("repa.cli.align", "CKNNA/CKA/mutual-kNN between model layers and encoders"),
    "prepare": ("repa.cli.prepare", "image folder -> VAE latents and encoder-target shards"),
    "export-vae": ("repa.cli.export_vae", "a REPA-E run's tuned VAE -> a diffusers folder"),
    "train-vae": ("repa.cli.train_vae", "a small AutoencoderKL trained on a config's images -> a diffusers folder"),
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


def add_debug_flag(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """`--debug` before or after the command (and after a nested one: `repa eval score ... --debug`)."""
    if "--debug" not in parser._option_string_actions:
        parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                            help="show the full traceback of an error (also REPA_DEBUG=1)")  # fmt: skip
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                add_debug_flag(sub, top=False)


def debug_enabled(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("REPA_DEBUG", "") not in ("", "0")


def _lines(text: str) -> str:
    """At most two lines: the CLI promises a short message; `--debug` shows everything."""
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 2:
        lines = [lines[0], f"{lines[1]} [{len(lines) - 2} more lines: --debug shows them]"]
    return "\n".join(lines)


def os_error_message(err: OSError) -> tuple[str, int]:
    """What failed, on which file, the reason in words and what to do; the exit code (disk fault or other)."""
    reason, hint = errors.OS_REASONS.get(err.errno, (None, None))  # type: ignore[arg-type]
    detail = err.strerror or str(err) or type(err).__name__
    if err.filename is not None:
        names = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 is not None else "")
        text = f"{names}: {reason or detail}"
    else:
        text = detail if not reason or reason in detail.lower() else f"{detail} ({reason})"
    if hint and "rerun" not in text:
        text += f"; {hint}"
    return _lines(text), errors.EXIT_DISK if reason else errors.EXIT_OS


def describe(err: BaseException) -> tuple[str, int] | None:
    """The message and exit code for a documented fault; None for anything else (a bug keeps its traceback)."""
    if isinstance(err, errors.ReportedError):
        return _lines(str(err) or type(err).__name__), err.exit_code
    if isinstance(err, yaml.YAMLError):
        return " ".join(line.strip() for line in str(err).splitlines() if line.strip()), errors.EXIT_USAGE
    if isinstance(err, (ValueError, KeyError, FileNotFoundError)):  # user mistakes, as each command reports them
        text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else err
        return _lines(str(text) or type(err).__name__), errors.EXIT_USAGE
    if isinstance(err, OSError):
        return os_error_message(err)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if debug_enabled(args):
            raise
        resume = "; rerun the same command to resume from the newest checkpoint" if args.command == "train" else ""
        print(f"repa {args.command}: interrupted{resume}", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    except Exception as err:  # one or two lines for documented faults; a bug keeps its traceback
        report = None if debug_enabled(args) else describe(err)
        if report is None:
            raise
        message, code = report
        print(f"repa {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
