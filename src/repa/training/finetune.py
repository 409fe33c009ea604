"""`model.init_from`: start a fresh run from public weights (official REPA `last.pt`, a SiT or DiT checkpoint, a
repa run or checkpoint) read by `repa.loading.load_for_finetuning`: strict backbone keys, the checkpoint's projectors
kept where they fit the run's, else the run's own (seeded) ones. The model's architecture is the config's
(`model.name` and its overrides, `model.num_heads` included); the checkpoint must fit it. On resume the run's
checkpoint wins and `model.init_from` is not read. The source is recorded in `<run_dir>/init_from.json` (path, sha256,
format, which tensors were fresh)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repa import distributed
from repa.assets import update_digest
from repa.checkpoint import CheckpointError
from repa.config import Config, ConfigError
from repa.fileio import write_json
from repa.loading import load_for_finetuning, resolve_checkpoint

RECORD = "init_from.json"


def resolve_init_from(cfg: Config) -> Path | None:
    """The checkpoint `model.init_from` names (a run folder: its newest checkpoint), checked before any work.

    Raises:
        ConfigError: the path does not exist, or is a folder with no checkpoint.
    """
    if cfg.model.init_from is None:
        return None
    try:
        return resolve_checkpoint(Path(cfg.model.init_from).expanduser())
    except FileNotFoundError as err:
        raise ConfigError(f"model.init_from={cfg.model.init_from}: {err}") from err


def sha256_of(path: Path) -> str:
    """sha256 of a file; of a folder (a repa checkpoint), of its files' relative names and bytes in sorted order."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        update_digest(digest, file)
    return digest.hexdigest()


def initialise_from(cfg: Config, model: nn.Module, path: Path, run_dir: Path) -> dict[str, Any]:
    """Copy the checkpoint's backbone (and fitting projectors) into `model`, built from the config; write the record
    (main process) and print one line.

    Returns:
        the record: path, sha256, `format` (the convention: repa, sit, dit), `source` (the file kind: official,
        repa, safetensors, state_dict), `fresh` (the model's tensors not from the checkpoint: their own seeded
        init), `dropped` (checkpoint projectors not used).

    Raises:
        ConfigError: the checkpoint's architecture does not fit the config's model (one line naming a tensor).
        CheckpointError: the file cannot be read safely.
    """
    key = f"model.init_from={cfg.model.init_from}"
    try:
        with torch.random.fork_rng(devices=[]):  # building the loader's model must not move the run's RNG
            source, report = load_for_finetuning(
                path, encoder_dims=getattr(model, "encoder_dims", ()), align_depth=getattr(model, "align_depth", 8),
                projector_dim=cfg.model.projector_dim, num_heads=getattr(model, "num_heads", None),
                class_dropout_prob=cfg.model.class_dropout_prob,
            )  # fmt: skip
    except CheckpointError as err:
        raise CheckpointError(f"{key}: {err}") from err
    except ValueError as err:
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from err
    theirs = {k: v for k, v in source.state_dict().items() if k not in set(report["new_keys"])}
    ours = model.state_dict()
    arch = report["model_kwargs"]
    where = (f"the checkpoint: width {arch['hidden_size']}, depth {arch['depth']}, patch {arch['patch_size']}, "
             f"channels {arch['in_channels']}, classes {arch['num_classes']}, input {arch['input_size']}")  # fmt: skip
    unused = [k for k in theirs if k not in ours and not k.startswith("projectors.")]
    differ = [k for k in theirs if k in ours and tuple(ours[k].shape) != tuple(theirs[k].shape)]
    backbone = {k.split(".")[0] for k in theirs} - {"projectors"}  # the family's extra modules may start fresh
    missing = [k for k in ours if k not in theirs and k.split(".")[0] in backbone]
    if unused or differ or missing:
        k = (differ or unused or missing)[0]
        what = (f"{k} is {list(theirs[k].shape)} there, {list(ours[k].shape)} here" if differ
                else f"{k} is not in the model" if unused else f"the model's {k} is not in the checkpoint")  # fmt: skip
        raise ConfigError(f"{key} does not fit the config's model ({cfg.model.name}; {what}): {where}. Set model.name "
                          "(and model.hidden_size / depth / num_heads / qk_norm) and the data to the checkpoint's")  # fmt: skip
    copied = {k: v for k, v in theirs.items() if k in ours}
    with torch.no_grad():
        for k, v in copied.items():
            ours[k].copy_(v)
    fresh = sorted(set(ours) - set(copied))
    fresh_modules = sorted({k.split(".")[0] for k in fresh})  # `projectors.0.0.weight` -> `projectors`
    dropped = sorted(set(report["dropped_keys"]) | {k for k in theirs if k not in ours})
    record = {"path": str(path.resolve()), "sha256": sha256_of(path) if distributed.is_main() else None,
              "format": report["format"], "source": report.get("source_format"), "fresh": fresh,
              "dropped": dropped}  # fmt: skip
    if distributed.is_main():
        write_json(record, run_dir / RECORD)
    distributed.print0(
        f"[repa] model.init_from: {len(copied)} tensors from {path} ({report['format']} conventions, sha256 "
        f"{str(record['sha256'])[:12]}...); {len(fresh)} fresh ({', '.join(fresh_modules) or 'none'}); "
        f"recorded in {run_dir / RECORD}"
    )
    return record
