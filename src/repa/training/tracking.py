"""Optional experiment trackers (`train.trackers: [tensorboard, wandb]`) through Accelerate's trackers: the scalars of
`metrics.jsonl` at the same steps, and the periodic sample grids as images. Files go under `<run_dir>/trackers/`.

Neither package is a dependency of repa (`pip install 'repa[tensorboard]'` / `'repa[wandb]'`); both are imported
only when named. W&B runs offline (no account, files only; `wandb sync` uploads them later) unless `WANDB_MODE` says
otherwise or `WANDB_API_KEY` is set. On resume the trackers start again: TensorBoard drops the events of the steps
the resume replays (`purge_step`, as `metrics.jsonl` is trimmed), W&B continues the run of the same id.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from repa.config import Config, ConfigError, to_dict
from repa.config.validate import TRACKERS
from repa.training.resume import flatten

TRACKERS_DIR = "trackers"
PROJECT = "repa"  # the W&B project unless WANDB_PROJECT names one; TensorBoard writes to trackers/<project>/
WANDB_ID_FILE = "wandb_run_id"


def check_installed(names: list[str]) -> None:
    """Each tracker named is known and importable (Accelerate would silently drop a missing one).

    Raises:
        ConfigError: an unknown name, or a tracker whose package is not installed (naming the pip extra).
    """
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.trackers: {name!r} is not a tracker (valid: {', '.join(TRACKERS)})")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.trackers lists {name}, which is not installed: pip install 'repa[{name}]' "
                              f"(or remove it from train.trackers)")  # fmt: skip


def tracker_dir(run_dir: str | Path) -> Path:
    """Where the trackers write (Accelerate's `project_dir`)."""
    return Path(run_dir) / TRACKERS_DIR


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as dotted keys with scalar values (lists as JSON): TensorBoard's hparams take only scalars."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple)) else v for k, v in flatten(to_dict(cfg)).items()}


def wandb_mode() -> str | None:
    """`WANDB_MODE` when set (wandb reads it itself: None), else offline without `WANDB_API_KEY` (no account needed),
    else wandb's default (online)."""
    return None if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY") else "offline"


def _wandb_kwargs(run_dir: Path) -> dict[str, Any]:
    """`wandb.init` arguments: files under trackers/, the run folder's name, one run id per run folder (resumes
    continue it)."""
    folder = tracker_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / WANDB_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n", encoding="utf-8")
    kwargs: dict[str, Any] = {"dir": str(folder), "name": run_dir.resolve().name, "id": run_id, "resume": "allow"}
    mode = wandb_mode()
    if mode is not None:
        kwargs["mode"] = mode
    return kwargs


class Trackers:
    """The run's trackers, started with `accelerator.init_trackers`; with none named every method does nothing
    (`metrics.jsonl` alone, as without this class).

    Args:
        acc: the Accelerator (made with `log_with` = the names, `distributed.make_accelerator`).
        cfg: the run's config (logged as the trackers' hyper-parameters).
        run_dir: the run folder.
        start_step: the step training starts from (a resume replays the steps after its checkpoint).
    """

    def __init__(self, acc: Any, cfg: Config, run_dir: Path, start_step: int) -> None:
        self.acc, self.names, self.open = acc, list(cfg.train.trackers), False
        if not self.names or start_step >= cfg.train.max_steps:  # nothing to log: no empty tracker run
            return
        init_kwargs: dict[str, dict[str, Any]] = {}
        if "tensorboard" in self.names and start_step > 0:
            init_kwargs["tensorboard"] = {"purge_step": start_step + 1}  # steps <= start_step stay logged
        if "wandb" in self.names and acc.is_main_process:
            init_kwargs["wandb"] = _wandb_kwargs(run_dir)
        project = os.environ.get("WANDB_PROJECT") or PROJECT
        acc.init_trackers(project, config=flat_config(cfg), init_kwargs=init_kwargs)
        self.open = True

    def log(self, record: dict[str, Any], step: int) -> None:
        """The scalars of one `metrics.jsonl` record at its step (main process)."""
        if self.open:
            self.acc.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_grid(self, path: Path, step: int) -> None:
        """A sample grid PNG as the image `samples` (main process)."""
        if not self.open:
            return
        image = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3) uint8
        if "tensorboard" in self.names:
            writer = self.acc.get_tracker("tensorboard", unwrap=True)
            writer.add_image("samples", image, step, dataformats="HWC")
            writer.flush()
        if "wandb" in self.names:
            import wandb  # installed: check_installed

            self.acc.get_tracker("wandb", unwrap=True).log({"samples": wandb.Image(image)}, step=step)

    def end(self) -> None:
        """`accelerator.end_training()`: finish every tracker (a collective: every process calls it)."""
        if self.open:
            self.open = False
            self.acc.end_training()

    def close(self) -> None:
        """On an exception: finish the trackers without `end_training`'s barrier (another process may be gone)."""
        if self.open:
            self.open = False
            for tracker in self.acc.trackers:
                tracker.finish()
