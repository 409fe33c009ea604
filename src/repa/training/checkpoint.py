"""Atomic, pickle-free checkpoints: safetensors weights + torch tensors-only optimizer state + JSON metadata."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which file and why."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    optimizer: dict[str, Any] | None,
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `<ckpt_root>/step_XXXXXXXX/` atomically and prune older checkpoints (keeping `keep`).

    Files are written into a hidden temporary folder, fsync'ed, and the folder is renamed into place, so a
    crash or a full disk at any moment leaves either the complete new checkpoint or none of it; the previous
    checkpoint is never touched before the new one exists.

    Returns:
        the final checkpoint folder.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_file(_contiguous(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_contiguous(ema), str(tmp / "ema.safetensors"))
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")  # tensors, numbers, lists, dicts: weights_only-loadable
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1), encoding="utf-8")
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # same step written again (e.g. a resumed run re-saving): replace it
            old = root / f".old_step_{step:08d}_{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = {
            errno.ENOSPC: "no space left on device",
            errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied",
        }.get(err.errno, str(err))
        prev = latest_checkpoint(root)
        kept = f"; the previous checkpoint {prev} is intact" if prev else ""
        raise CheckpointError(f"could not write checkpoint {final}: {reason}{kept}") from err
    prune_checkpoints(root, keep)
    return final


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def prune_checkpoints(ckpt_root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    root = Path(ckpt_root)
    for p in root.glob(".tmp_step_*"):
        pid = p.name.rsplit("_", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for p in list_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, *, optimizer: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder written by `save_checkpoint` without unpickling anything.

    Returns:
        dict with `model`, `ema` (or None), `optimizer` (or None), and the JSON metadata under `state`.
    """
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a repa checkpoint (no state.json)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        out: dict[str, Any] = {"state": state, "model": load_file(str(path / "model.safetensors"))}
        out["ema"] = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").exists() else None
        out["optimizer"] = None
        if optimizer and (path / "optimizer.pt").exists():
            out["optimizer"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"could not read checkpoint {path}: {err}") from err
    return out


def load_model_weights(path: str | Path, prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights for inference from any supported file, never unpickling arbitrary objects.

    Accepts a repa checkpoint folder, a `.safetensors` file, or an official REPA/DiT/SiT `.pt` file (a bare
    state dict, or a dict with `model`/`ema` entries; the argparse Namespace official REPA stores under
    `args` is allow-listed as plain data). Returns (state_dict, info) where info describes the source.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        ckpt = load_checkpoint(path, optimizer=False)
        use_ema = prefer_ema and ckpt["ema"] is not None
        return (ckpt["ema"] if use_ema else ckpt["model"]), {"format": "repa", "ema": use_ema, **ckpt["state"]}
    if path.suffix == ".safetensors":
        return load_file(str(path)), {"format": "safetensors", "ema": False}
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError subclasses and others
            raise CheckpointError(
                f"refusing to load {path}: it is not a plain tensor checkpoint ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}). Only safetensors and weights_only-loadable files are accepted."
            ) from err
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        key = "ema" if prefer_ema and "ema" in obj else "model"
        info = {"format": "official", "ema": key == "ema", "step": obj.get("steps")}
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            info["args"] = vars(args)
        return obj[key], info
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {"format": "state_dict", "ema": False}
    raise CheckpointError(f"{path}: unrecognised checkpoint layout (keys: {list(obj)[:8]})")
