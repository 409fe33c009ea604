"""`--time-steps N`: every arm's training step timed side by side in this process, so the leaderboard's s/step column
compares arms measured under the same conditions (the logged rates of the benchmark's own runs are not comparable when
runs shared the machine with other work).

Each arm trains fresh short runs through the real training loop (`repa.training.train`: data, encoder or cached
targets, loss, optimizer, EMA, every per-step cost of the method) with the preset's batch and threads. The arms are
interleaved over rounds in alternating order (A..Z, then Z..A) so that a drift of the machine's speed lands on every
arm alike. A run logs every `WINDOW` steps; its first window (allocation, warm caches) is dropped and the s/step of
the others, over all rounds, gives the arm's median.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.convergence.jobs import Job
from benchmarks.convergence.presets import REPA, VANILLA, Arm, Preset
from benchmarks.convergence.report import TIMES
from repa.hardware import cpu_bf16
from repa.training import train

WINDOW = 5


def timing_overrides(steps: int) -> tuple[str, ...]:
    """Config overrides of a timing run: `steps` (rounded up to whole windows) timed steps after one warm-up window;
    no checkpoint before the end and a one-image, two-step grid at the end (the loop always samples there)."""
    total = WINDOW * (1 + -(-steps // WINDOW))
    return (f"train.max_steps={total}", f"train.log_every={WINDOW}", f"train.checkpoint_every={total}",
            f"train.sample_every={total}", "train.keep_checkpoints=1", "sample.num_images=1", "sample.num_steps=2")  # fmt: skip


def window_seconds(run_dir: Path, batch_size: int) -> list[float]:
    """Seconds per step of each logged window of a timing run after the first (the warm-up)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [batch_size / r["images_per_s"] for r in records if r["step"] > WINDOW and r.get("images_per_s")]


def time_arms(preset: Preset, ablations: Sequence[Arm], *, out: Path, config: str, overrides: Sequence[str] = (),
              data_root: str | None = None, steps: int = 20, rounds: int = 2) -> dict[str, Any]:  # fmt: skip
    """Time `steps` training steps of vanilla, REPA and each ablation arm, `rounds` times interleaved; write
    `<out>/step_times.json` and return its content ({"arms": {name: {"s_per_step": median, "windows": [...]}}, ...})."""
    if steps < 1 or rounds < 1:
        raise ValueError(f"--time-steps {steps} with {rounds} round(s): need at least one step and one round")
    arms = [VANILLA, REPA, *ablations]
    threads = torch.get_num_threads()
    torch.set_num_threads(preset.threads)
    windows: dict[str, list[float]] = {a.name: [] for a in arms}
    try:
        with tempfile.TemporaryDirectory(prefix="repa-step-times-") as tmp:
            for r in range(rounds):
                for arm in arms if r % 2 == 0 else arms[::-1]:
                    job = Job(arm, preset.seeds[0], preset, config, (*overrides, *timing_overrides(steps)),
                              str(Path(tmp) / f"round{r}"), data_root, ())  # fmt: skip
                    train(job.train_config())
                    windows[arm.name] += window_seconds(job.run_dir, preset.batch_size)
                    print(f"[convergence] timing round {r + 1}/{rounds}, {arm.name}: "
                          f"{statistics.median(windows[arm.name]):.3f} s/step so far", flush=True)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    result = {"cpu": cpu_bf16().cpu, "machine": platform.machine(), "threads": preset.threads,
              "batch_size": preset.batch_size, "steps": steps, "rounds": rounds, "window": WINDOW,
              "arms": {name: {"s_per_step": statistics.median(w), "windows": w} for name, w in windows.items()}}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / TIMES).write_text(json.dumps(result, indent=1) + "\n")
    for name, v in result["arms"].items():
        print(f"[convergence] {name}: {v['s_per_step']:.3f} s/step (median of {len(v['windows'])} windows of "
              f"{WINDOW} steps)", flush=True)  # fmt: skip
    print(f"[convergence] wrote {out / TIMES}", flush=True)
    return result
