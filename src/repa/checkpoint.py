"""Atomic, pickle-free checkpoints: safetensors weights + torch tensors-only optimizer state + JSON metadata.

Kill-anywhere contract (tested in tests/test_faults.py): a checkpoint folder `step_XXXXXXXX` appears only by a rename
of a complete, fsync'ed temporary folder; a process killed at any instant leaves either the previous checkpoints
or the new one, plus hidden leftovers (`.tmp_*`, `.old_*`, `.trash_*`) that are never read as checkpoints and are
cleaned (or, for `.old_*`, restored) by the next save. The environment variable `REPA_FAULT_AFTER_FILE=<point>[@<step>]`
is a test hook: the process SIGKILLs itself at that point of a checkpoint write (see `FAULT_POINTS`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from repa.errors import ReportedError, brief
from repa.fileio import fsync_file, write_error_reason

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_OLD_DIR = re.compile(r"^\.old_step_(\d{8})_\d+$")
# where REPA_FAULT_AFTER_FILE may kill a checkpoint write: after each file lands in the temporary folder, after the
# fsyncs, while a same-step checkpoint is moved aside, after the rename into place, and while pruning
FAULT_POINTS = ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.json", "fsync", "old", "rename", "prune")


class CheckpointError(ReportedError, RuntimeError):
    """A checkpoint could not be written or read; the message says which file and why."""

    exit_code = 4


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: not every file system opens or fsyncs a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fault_point(point: str, step: int) -> None:
    """Test hook: SIGKILL this process here if REPA_FAULT_AFTER_FILE names `point` (and `step`, if given)."""
    spec = os.environ.get("REPA_FAULT_AFTER_FILE")
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == point and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


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
    vae: dict[str, torch.Tensor] | None = None,
    vae_metadata: dict[str, str] | None = None,
) -> Path:
    """Write `<ckpt_root>/step_XXXXXXXX/` atomically and prune older checkpoints (keeping `keep`); REPA-E's `vae`
    goes to `vae.safetensors` with `vae_metadata`.

    Files are written into a hidden temporary folder, fsync'ed, and the folder is renamed into place, so a
    crash or a full disk at any moment leaves either the complete new checkpoint or none of it; the previous
    checkpoint is never touched before the new one exists.

    Returns:
        the final checkpoint folder.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:  # it names the folder
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    root = Path(ckpt_root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(_contiguous(model), str(tmp / "model.safetensors"))
        _fault_point("model.safetensors", step)
        if ema is not None:
            save_file(_contiguous(ema), str(tmp / "ema.safetensors"))
            _fault_point("ema.safetensors", step)
        if vae is not None:
            save_file(_contiguous(vae), str(tmp / "vae.safetensors"), metadata=vae_metadata)
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")  # tensors, numbers, lists, dicts: weights_only-loadable
            _fault_point("optimizer.pt", step)
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1), encoding="utf-8")
        _fault_point("state.json", step)
        for f in tmp.iterdir():
            fsync_file(f)
        _fsync_dir(tmp)
        _fault_point("fsync", step)
        if final.exists():  # the same step written again (e.g. a second run in this folder): replace it
            old = root / f".old_step_{step:08d}_{os.getpid()}"
            final.rename(old)  # a crash before the next rename leaves `old`, which list/prune treat as step_XXX
            _fault_point("old", step)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        _fault_point("rename", step)
    except Exception as err:  # noqa: BLE001 - safetensors and torch.save wrap a full disk in their own errors
        reason = write_error_reason(err, root)  # before the partial files go: deleting them frees the full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {reason}{_intact(root)}") from err
    prune_checkpoints(root, keep, step=step)
    return final


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first: renamed-into-place `step_XXXXXXXX` folders, and a `.old_step_XXXXXXXX_*`
    folder whose replacement was interrupted (it was complete before being moved aside). Read-only."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name) or _OLD_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            step = int(m.group(1))
            if step not in found or _STEP_DIR.match(p.name):  # the renamed-into-place folder wins
                found[step] = p
    return [found[s] for s in sorted(found)]


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def _intact(ckpt_root: str | Path) -> str:
    """The end of a failed write's message: the newest checkpoint, untouched."""
    prev = latest_checkpoint(ckpt_root)
    return f"; the previous checkpoint {prev} is intact" if prev else ""


def load_latest_checkpoint(ckpt_root: str | Path) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, contents) of the newest checkpoint, with model, EMA and optimizer state; (None, None) if there is none.

    Raises:
        CheckpointError: the newest checkpoint cannot be read (damaged outside repa: writes are atomic) or holds
            NaN/inf (written before repa refused non-finite updates). Training does not silently fall back to an
            older one (with `keep` small, its new checkpoints would be pruned in favour of the damaged newer step);
            the message names the previous checkpoint to resume from.
    """
    return _newest(ckpt_root, _load_for_training)


def latest_checkpoint_state(ckpt_root: str | Path) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, state.json metadata) of the newest checkpoint, reading nothing else; (None, None) if there is none.

    Raises:
        CheckpointError: as `load_latest_checkpoint`, for the metadata.
    """
    return _newest(ckpt_root, read_checkpoint_state)


def _newest(ckpt_root: str | Path, read: Any) -> tuple[Path | None, Any]:
    found = list_checkpoints(ckpt_root)
    if not found:
        return None, None
    path = found[-1]
    try:
        return path, read(path)
    except CheckpointError as err:
        prev = f"the previous one is {found[-2]}" if len(found) > 1 else "there is no older one"
        raise CheckpointError(
            f"{err}. Move {path} out of {path.parent} to resume from an older checkpoint ({prev})"
        ) from err


def _load_for_training(path: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    missing = [k for k in ("ema", "optimizer") if ckpt[k] is None]
    if missing:
        raise CheckpointError(f"{path} has no {' / '.join(missing)} state to resume training from")
    bad = nonfinite_tensors({k: ckpt[k] or {} for k in ("model", "ema", "optimizer", "vae")})
    if bad:
        raise CheckpointError(f"{path} holds NaN/inf values in {len(bad)} tensors (e.g. {bad[0]}); resuming from it "
                              "would train on non-finite weights")  # fmt: skip
    return ckpt


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors holding NaN/inf in a nest of dicts/lists (state dicts)."""
    if isinstance(tree, torch.Tensor):
        return [prefix] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [name for k, v in items for name in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def prune_checkpoints(ckpt_root: str | Path, keep: int, *, step: int = -1) -> None:
    """Delete all but the newest `keep` checkpoints and the leftovers of interrupted writes; restore a checkpoint
    whose same-step replacement was interrupted. Each deletion starts with a rename to a hidden `.trash_` name, so
    a checkpoint folder is never left half-deleted."""
    root = Path(ckpt_root)
    for p in root.glob(".old_step_*"):
        m = _OLD_DIR.match(p.name)
        final = root / f"step_{m.group(1)}" if m else None
        if final is not None and not final.exists() and (p / "state.json").is_file():
            p.rename(final)  # the interrupted replacement never produced the new folder: put the old one back
        else:
            _remove(p, step)
    for p in root.glob(".tmp_step_*"):
        pid = p.name.rsplit("_", 1)[-1]
        if pid != str(os.getpid()):
            _remove(p, step)
    for p in root.glob(".trash_*"):
        shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for p in list_checkpoints(root)[:-keep]:
            _remove(p, step)


def _remove(path: Path, step: int) -> None:
    trash = path.with_name(f".trash_{path.name.lstrip('.')}_{os.getpid()}")
    try:
        path.rename(trash)
    except OSError:
        trash = path
    if _STEP_DIR.match(path.name):
        _fault_point("prune", step)  # between the rename and the deletion of an old checkpoint
    shutil.rmtree(trash, ignore_errors=True)


def check_writable(directory: str | Path) -> None:
    """Raise CheckpointError (naming the folder and the reason) unless a file can be created in `directory`."""
    directory = Path(directory)
    probe = directory / f".write_test_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        fsync_file(probe)
    except OSError as err:
        raise CheckpointError(f"run directory {directory} is not writable: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The JSON metadata (`state.json`) of a checkpoint folder: step, config, counters.

    Raises:
        CheckpointError: missing, not JSON, or a `step` that is not the folder's.
    """
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        _check_state(path, state)
    except Exception as err:  # noqa: BLE001 - OSError, JSON errors, the checks' ValueError
        raise CheckpointError(f"could not read checkpoint {path}: {brief(err)}") from err
    return state


def model_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of a checkpoint's `model.safetensors`, from its header alone.

    Raises:
        CheckpointError: the file is missing or not safetensors.
    """
    file = Path(path) / "model.safetensors"
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - OSError, SafetensorError
        raise CheckpointError(f"could not read checkpoint {file}: {brief(err)}") from err


def load_checkpoint(path: str | Path, *, optimizer: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder written by `save_checkpoint` without unpickling anything.

    Returns:
        dict with `model`, `ema` (or None), `optimizer` (or None), and the JSON metadata under `state`.
    """
    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a repa checkpoint (no state.json)")
    out: dict[str, Any] = {"state": read_checkpoint_state(path)}
    try:
        out["model"] = load_file(str(path / "model.safetensors"))
        out["ema"] = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").exists() else None
        out["vae"] = load_file(str(path / "vae.safetensors")) if (path / "vae.safetensors").exists() else None
        out["optimizer"] = None
        if optimizer and (path / "optimizer.pt").exists():
            out["optimizer"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - OSError, SafetensorError, UnpicklingError, EOFError, zip errors
        raise CheckpointError(f"could not read checkpoint {path}: {brief(err)}") from err
    return out


def _check_state(path: Path, state: Any) -> None:
    """The metadata must be a mapping whose integer `step` matches the folder name (it decides where to resume)."""
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"state.json: 'step' must be a non-negative integer, got {step!r}")
    m = _STEP_DIR.match(path.name) or _OLD_DIR.match(path.name)
    if m and int(m.group(1)) != step:
        raise ValueError(f"state.json says step {step} but the folder is {path.name}")


class Stateful(Protocol):
    """Anything with `state_dict()` / `load_state_dict(state)` (modules, optimizers, schedulers, EMA, scalers)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def save_training_checkpoint(
    ckpt_root: str | Path,
    step: int,
    *,
    model: Stateful,
    ema: Stateful,
    optimizer: Stateful,
    scheduler: Stateful,
    scaler: Stateful | None = None,
    meta: dict[str, Any],
    keep: int = 2,
    vae: Stateful | None = None,
) -> Path:
    """A training checkpoint (`save_checkpoint`): model, EMA, optimizer + scheduler (+ fp16 scaler, REPA-E's VAE) state.

    Raises:
        CheckpointError: a tensor holds NaN/inf (nothing is written; the previous checkpoints stay). Training refuses
            non-finite updates, so this is a last line of defence.
    """
    opt_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if scaler is not None:
        opt_state["scaler"] = scaler.state_dict()
    weights, averaged = model.state_dict(), ema.state_dict()
    tuned = vae.state_dict() if vae is not None else None
    bad = nonfinite_tensors({"model": weights, "ema": averaged, "optimizer": opt_state, "vae": tuned or {}})
    if bad:
        raise CheckpointError(f"refusing to write checkpoint step {step}: NaN/inf in {len(bad)} tensors (e.g. "
                              f"{bad[0]}){_intact(ckpt_root)}")  # fmt: skip
    vae_meta = vae.file_metadata() if vae is not None else None  # type: ignore[attr-defined]
    return save_checkpoint(ckpt_root, step, model=weights, ema=averaged, optimizer=opt_state, meta=meta, keep=keep,
                           vae=tuned, vae_metadata=vae_meta)  # fmt: skip


def restore_training_checkpoint(
    ckpt: dict[str, Any],
    *,
    model: Stateful,
    ema: Stateful,
    optimizer: Stateful,
    scheduler: Stateful,
    scaler: Stateful | None = None,
    vae: Stateful | None = None,
) -> dict[str, Any]:
    """Load what `save_training_checkpoint` wrote (as read by `load_latest_checkpoint`) into the run's objects;
    returns the checkpoint's metadata (`step`, `nonfinite_steps`, `config`, ...); REPA-E's `vae` must be there."""
    if vae is not None and ckpt.get("vae") is None:
        raise CheckpointError("the checkpoint holds no tuned VAE (vae.safetensors): written without train.end_to_end")
    model.load_state_dict(ckpt["model"])
    if vae is not None:
        vae.load_state_dict(ckpt["vae"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"]["optimizer"])
    scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
    if scaler is not None and "scaler" in ckpt["optimizer"]:
        scaler.load_state_dict(ckpt["optimizer"]["scaler"])
    return ckpt["state"]
