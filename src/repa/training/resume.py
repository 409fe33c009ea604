"""Resuming a run with another config: harmless changes pass, changes to the model or the maths are refused (or,
with `--allow-config-change`, accepted); every change is recorded in the run (`config_changes.jsonl`, checkpoints).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repa.checkpoint import latest_checkpoint_state, model_shapes
from repa.config import Config, from_dict, to_dict
from repa.errors import ReportedError
from repa.fileio import write_text_atomic

CHANGES_LOG = "config_changes.jsonl"
# what may change between two runs of one training: when and how often it logs, samples, checkpoints and stops,
# and how fast it runs (threads, compilation, recomputation, data workers, cached vs online targets: the same
# values up to float rounding); `sample.*` sets only the periodic grids
HARMLESS = frozenset({
    "train.max_steps", "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.max_nonfinite_steps", "train.num_threads", "train.progress", "train.compile",
    "train.compile_memory_budget", "model.grad_checkpointing", "data.num_workers", "repa.cache_targets",
    "train.trackers",  # where the scalars are also sent
    "train.fsdp", "train.fsdp_reshard_after_forward",  # the same maths and the same checkpoint files, sharded or not
    "model.init_from",  # read on a fresh start only: on resume the checkpoint's weights win
})  # fmt: skip
# harmless unless the lr decays over them: a cosine/linear schedule ends at train.max_steps
SCHEDULE_KEYS = frozenset({"train.max_steps"})
HARMLESS_SECTIONS = ("sample.",)
IGNORED = frozenset({"train.run_dir"})  # where the run is (it may be moved), not what it is


class ConfigChangeError(ReportedError, ValueError):
    """A resume whose config changes the model or the training maths (without --allow-config-change), or whose
    model no longer fits the checkpoint."""

    exit_code = 21


@dataclass
class ConfigChange:
    key: str
    old: Any
    new: Any

    @property
    def harmless(self) -> bool:
        return self.key in HARMLESS or self.key.startswith(HARMLESS_SECTIONS)

    def __str__(self) -> str:
        return f"{self.key} {_show(self.old)} -> {_show(self.new)}"


@dataclass
class Resume:
    """Where a run resumes from (nothing: `path` None, step 0) and how its config changed since that checkpoint.

    Attributes:
        history: every change recorded in the run so far, this resume's included ({step, key, old, new} dicts).
    """

    path: Path | None = None
    step: int = 0
    changes: list[ConfigChange] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


_ABSENT = object()  # a key one of the two configs does not have


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (a config's `to_dict`) as one dict of dotted keys (`train.max_steps`), in their order."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _normalised(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored config with today's defaults filled in (a key added since is not a change); as stored if it no
    longer loads (a key since removed, or a value today's checks refuse)."""
    try:
        return to_dict(from_dict(stored))
    except (ValueError, TypeError):
        return stored


def diff_configs(old: dict[str, Any], new: dict[str, Any]) -> list[ConfigChange]:
    """The dotted keys whose values differ, in the order of the new config."""
    a, b = flatten(_normalised(old)), flatten(new)
    keys = [k for k in list(b) + [k for k in a if k not in b] if k not in IGNORED]
    return [
        ConfigChange(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    ]


def plan_resume(cfg: Config, run_dir: Path, allow_config_change: bool) -> Resume:
    """Compare `cfg` with the config of the run's newest checkpoint (its state.json only: before any work).

    Raises:
        ConfigChangeError: a change to the model or the maths, without `allow_config_change`.
        CheckpointError: the newest checkpoint's metadata cannot be read.
    """
    path, state = latest_checkpoint_state(run_dir / "checkpoints")
    if path is None:
        return Resume()
    step = int(state["step"])
    stored = state.get("config")
    changes = diff_configs(stored, to_dict(cfg)) if isinstance(stored, dict) else []
    decays = cfg.optim.lr_schedule != "constant"  # (a change of the schedule itself is refused on its own)
    refused = [c for c in changes if not c.harmless or (decays and c.key in SCHEDULE_KEYS)]
    if refused and not allow_config_change:
        raise ConfigChangeError(
            f"cannot resume {run_dir} from {path.name} with another config: {'; '.join(map(str, refused))} (these "
            "change the model or the training maths). Rerun with the run's settings (its config.yaml), choose a new "
            "train.run_dir, or pass --allow-config-change to continue with the new values (recorded in "
            f"{run_dir / CHANGES_LOG})"
        )
    history = [r for r in state.get("config_changes", []) if isinstance(r, dict)]
    history += [{"step": step, "key": c.key, "old": None if c.old is _ABSENT else c.old,
                 "new": None if c.new is _ABSENT else c.new} for c in changes]  # fmt: skip
    return Resume(path, step, changes, history)


def write_changes_log(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """`config_changes.jsonl`: one {step, key, old, new} line per change, rewritten atomically from the checkpoint's
    record (so a resume killed before its next checkpoint, then rerun, records its changes once)."""
    path = run_dir / CHANGES_LOG
    if not history:
        path.unlink(missing_ok=True)
        return
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in history))


def apply_optim_config(optimizer: Any, scheduler: Any, cfg: Config) -> None:
    """Put the config's AdamW settings over the restored ones: `load_state_dict` brings back the checkpoint's lr,
    betas, eps and weight decay (and the scheduler its base lr), so an accepted change would silently not apply.
    Unchanged settings give back the same values bit for bit (the scheduler's own lr = base lr x lambda(step)).
    A second param group is REPA-E's VAE (`train.vae_lr`)."""
    o = cfg.optim
    scheduler.base_lrs = [o.lr] + [cfg.train.vae_lr] * (len(optimizer.param_groups) - 1)
    for group, lr_lambda, lr in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        group.update(lr=lr * lr_lambda(scheduler.last_epoch), initial_lr=lr, betas=tuple(o.betas), eps=o.eps,
                     weight_decay=o.weight_decay)  # fmt: skip
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def check_model_fits(model: torch.nn.Module, resume: Resume) -> None:
    """One line instead of load_state_dict's wall of size mismatches when the checkpoint's model has another shape
    (read from its header: called before the targets are computed).

    Raises:
        ConfigChangeError: tensors differ in shape, are missing or unexpected.
    """
    if resume.path is None:
        return
    now = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    there = model_shapes(resume.path)
    differ = [k for k in now if k in there and now[k] != there[k]]
    missing, unexpected = [k for k in now if k not in there], [k for k in there if k not in now]
    if not (differ or missing or unexpected):
        return
    if differ:
        example = f"e.g. {differ[0]} is {list(there[differ[0]])} there, {list(now[differ[0]])} here"
    else:
        example = f"e.g. {(missing or unexpected)[0]} is {'missing' if missing else 'unexpected'}"
    changed = [str(c) for c in resume.changes if not c.harmless]
    why = f"; config changes: {'; '.join(changed)}" if changed else " (the data's channels or classes, the encoders?)"
    raise ConfigChangeError(
        f"cannot resume from {resume.path}: its model has another shape ({len(differ)} tensors differ, {len(missing)} "
        f"missing, {len(unexpected)} unexpected; {example}){why}. A run's model cannot change: resume with the run's "
        "settings or choose a new train.run_dir"
    )
