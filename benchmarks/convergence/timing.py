"""`--time-steps N`: every arm's training step timed side by side in this process, so the leaderboard's s/step column
compares arms measured under the same conditions (the logged rates of the benchmark's own runs are not comparable when
runs shared the machine with other work).

Each arm trains fresh short runs through the real training loop (`repa.training.train`: data, encoder or cached
targets, loss, optimizer, EMA, every per-step cost of the method) with the preset's batch and threads. The arms are
interleaved over rounds in alternating order (A..Z, then Z..A) so that a drift of the machine's speed lands on every
arm alike. A run logs every `WINDOW` steps; its first window (allocation, warm caches) is dropped and the s/step of
the others, over all rounds, gives the arm's median.

An arm whose alignment ends inside the budget (`repa.schedule` other than constant, `repa.schedule_stop` below the
preset's steps: HASTE) costs differently before and after the stop (after it the loop skips the encoder and the
alignment terms), so it is timed in both phases and its s/step is their mean weighted by the steps of each.
"""

from __future__ import annotations

import dataclasses
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
from repa.fileio import write_json
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


def _phases(job: Job) -> list[tuple[str, tuple[str, ...], int]]:
    """(label, extra overrides, steps of the budget) of each cost phase of an arm: one, or two when its alignment
    schedule ends inside the budget (timed after the stop as a run whose alignment stops at step 0)."""
    r, steps = job.train_config().repa, job.preset.steps
    if r.schedule == "constant" or r.schedule_stop is None or r.schedule_stop >= steps:
        return [("", (), steps)]
    return [("", (), r.schedule_stop), ("after-stop", ("repa.schedule=stop", "repa.schedule_stop=0"),
                                        steps - r.schedule_stop)]  # fmt: skip


def time_arms(preset: Preset, ablations: Sequence[Arm], *, out: Path, config: str, overrides: Sequence[str] = (),
              data_root: str | None = None, steps: int = 20, rounds: int = 2) -> dict[str, Any]:  # fmt: skip
    """Time `steps` training steps of vanilla, REPA and each ablation arm (each of its phases), `rounds` times
    interleaved; write `<out>/step_times.json` and return its content: {"arms": {name: {"s_per_step": s,
    "phases": {"aligned" | "after-stop": {"steps", "s_per_step" (median), "windows"}}}}, ...}."""
    if steps < 1 or rounds < 1:
        raise ValueError(f"--time-steps {steps} with {rounds} round(s): need at least one step and one round")
    arms = [VANILLA, REPA, *ablations]
    base = Job(REPA, preset.seeds[0], preset, config, (*overrides, *timing_overrides(steps)), "", data_root, ())
    runs = [(arm, label, extra, n) for arm in arms for label, extra, n in _phases(dataclasses.replace(base, arm=arm))]
    threads = torch.get_num_threads()
    torch.set_num_threads(preset.threads)
    windows: dict[tuple[str, str], list[float]] = {(arm.name, label): [] for arm, label, _, _ in runs}
    try:
        with tempfile.TemporaryDirectory(prefix="repa-step-times-") as tmp:
            for r in range(rounds):
                for arm, label, extra, _ in runs if r % 2 == 0 else runs[::-1]:
                    name = f"{arm.name}-{label}" if label else arm.name
                    job = dataclasses.replace(base, arm=Arm(name, (*arm.overrides, *extra)),
                                              out=str(Path(tmp) / f"round{r}"))  # fmt: skip
                    train(job.train_config())
                    windows[arm.name, label] += window_seconds(job.run_dir, preset.batch_size)
                    print(f"[convergence] timing round {r + 1}/{rounds}, {name}: "
                          f"{statistics.median(windows[arm.name, label]):.3f} s/step so far", flush=True)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    per_arm: dict[str, dict[str, Any]] = {}
    for arm, label, _, n in runs:
        entry = per_arm.setdefault(arm.name, {"phases": {}})
        entry["phases"][label or "aligned"] = {"steps": n, "s_per_step": statistics.median(windows[arm.name, label]),
                                               "windows": windows[arm.name, label]}  # fmt: skip
    for entry in per_arm.values():
        phases = entry["phases"].values()
        entry["s_per_step"] = sum(ph["steps"] * ph["s_per_step"] for ph in phases) / sum(ph["steps"] for ph in phases)
    result = {"cpu": cpu_bf16().cpu, "machine": platform.machine(), "threads": preset.threads,
              "batch_size": preset.batch_size, "steps": steps, "rounds": rounds, "window": WINDOW, "arms": per_arm}  # fmt: skip
    write_json(result, out / TIMES, indent=1)
    for name, v in per_arm.items():
        parts = ", ".join(f"{k} {ph['s_per_step']:.3f} over {ph['steps']} steps" for k, ph in v["phases"].items())
        print(f"[convergence] {name}: {v['s_per_step']:.3f} s/step ({parts}; medians of {WINDOW}-step windows)",
              flush=True)  # fmt: skip
    print(f"[convergence] wrote {out / TIMES}", flush=True)
    return result
