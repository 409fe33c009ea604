"""Runs: one (arm, seed) job trains to the preset's budget (resuming) and evaluates each saved eval step once;
`run_benchmark` runs every job (in parallel workers or in this process) and writes the report."""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import multiprocessing
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import temporary_environ
from benchmarks.convergence import evaluate
from benchmarks.convergence.presets import REPA, VANILLA, Arm, Preset, device_of, eval_steps
from benchmarks.convergence.report import read_step_times, write_results
from repa.checkpoint import list_checkpoints
from repa.config import Config, load_config
from repa.fileio import write_json
from repa.training import train
from repa.training.data import load_train_images
from repa.training.setup import plan_targets, prepare_targets


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to train and evaluate one (arm, seed) run."""

    arm: Arm
    seed: int
    preset: Preset
    config: str
    overrides: tuple[str, ...]
    out: str
    data_root: str | None
    layers: tuple[int, ...]
    defer_fid: bool = False  # save the FID samples instead of scoring them (no Inception network here)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / "runs" / f"{self.arm.name}-seed{self.seed}"

    def eval_path(self, step: int) -> Path:
        """Where the evaluation of `step` is written (its presence marks it done)."""
        return self.run_dir / "evals" / f"step_{step:08d}.json"

    def train_config(self) -> Config:
        p = self.preset
        evals = len(eval_steps(p))
        return load_config(self.config, [
            f"train.run_dir={self.run_dir}", f"train.seed={self.seed}", f"train.max_steps={p.steps}",
            f"train.global_batch_size={p.batch_size}", f"optim.lr={p.lr}", f"train.mixed_precision={p.precision}",
            f"train.checkpoint_every={p.eval_every}",
            f"train.keep_checkpoints={evals + 1}", f"train.sample_every={p.steps}", "train.progress=false",
            f"train.num_threads={p.threads}", f"data.num_train={'null' if p.num_train is None else p.num_train}",
            "sample.num_images=20", *([f"data.root={self.data_root}"] if self.data_root else []),
            *self.overrides, *(o.replace("{half}", str(p.steps // 2)) for o in self.arm.overrides),
        ])  # fmt: skip


def _logged(run_dir: Path, step: int) -> dict[str, Any]:
    """Training losses at `step` (the last metrics.jsonl record at or before it) and the median images/s of the log
    windows so far (a median: a window that spans a paused or shared machine does not drag it down)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    before = [r for r in records if r["step"] <= step]
    last = before[-1] if before else {}
    rates = [r["images_per_s"] for r in before if r.get("images_per_s")]
    return {"denoise": last.get("denoise"), "align": last.get("align"),
            "train_images_per_s": statistics.median(rates) if rates else None}  # fmt: skip


def run_job(job: Job) -> list[dict[str, Any]]:
    """Train one (arm, seed) run to the preset's budget (resuming), then evaluate every saved eval step once; a run
    whose every evaluation is written is returned as it is (its checkpoints may be gone, see `import_rows`)."""
    if (done := finished_rows(job)) is not None:
        return done
    torch.set_num_threads(job.preset.threads)
    shared = torch.load(Path(job.out) / "shared.pt", weights_only=True)  # tensors only (see `prepare_shared`)
    t0 = time.perf_counter()
    train(job.train_config())
    print(f"[convergence] {job.run_dir.name}: trained ({time.perf_counter() - t0:.0f} s)", flush=True)
    ckpts = {int(c.name.split("_")[-1]): c for c in list_checkpoints(job.run_dir / "checkpoints")}
    detector, rows = None, []
    for step in eval_steps(job.preset):
        out = job.eval_path(step)
        if out.is_file():
            row = json.loads(out.read_text())
        else:
            if step not in ckpts:
                raise FileNotFoundError(f"{job.run_dir}: no checkpoint for step {step}")
            if not job.defer_fid:
                detector = detector or evaluate.make_detector(device_of(job.preset))
            samples = job.run_dir / "fid-samples" / f"step_{step:08d}.npz" if job.defer_fid else None
            row = {"arm": job.arm.name, "seed": job.seed, "step": step,
                   **evaluate.evaluate_checkpoint(ckpts[step], job.preset, job.layers, shared, detector,
                                                  samples_out=samples)}  # fmt: skip
            row.update(_logged(job.run_dir, step))
            write_json(row, out, indent=1)  # written after the samples: a finished evaluation has both
            fid = "deferred" if row["fid"] is None else f"{row['fid']:.2f}"
            probe = ", ".join(f"block {k} {row[f'probe_acc_l{k}']:.3f}" for k in job.layers)
            print(f"[convergence] {job.run_dir.name} step {step}: FID {fid}, probe {probe}, "
                  f"eval {row['eval_s']:.0f} s", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def prepare_target_cache(cfg: Config) -> None:
    """Build the encoder-target cache of a REPA config once, before parallel workers would race to build it."""
    data = load_train_images(cfg)
    plan = plan_targets(cfg, data, torch.device("cpu"))
    if plan.cache:
        prepare_targets(cfg, data, plan.encoders)


def _check_out(out: Path, key: dict[str, Any]) -> None:
    """Refuse to mix results of different budgets in one folder (seeds and ablations may be added)."""
    meta = out / "benchmark.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old != key:
            raise ValueError(f"{out} holds a benchmark with other settings ({meta}); pass a new --out")
    else:
        write_json(key, meta, indent=1)


def run_benchmark(preset: Preset, *, out: Path, config: str, overrides: Sequence[str] = (),
                  ablations: Sequence[Arm] = (), data_root: str | None = None, command: str = "",
                  defer_fid: bool = False, report_only: bool = False,
                  rows_from: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Train and evaluate every (arm, seed), then write the CSV, markdown table, figure and summary.

    With `defer_fid` no Inception network is used: every evaluation saves its FID samples, `<out>/deferred.json`
    describes the benchmark, and `benchmarks.convergence.deferred.pack` / `score` finish the FID and the report
    elsewhere (the offline GPU bundle's path).

    With `report_only` nothing is trained or evaluated: the report covers the (arm, seed) runs whose every
    evaluation is written and lists the others as not finished (a benchmark run over several sittings).

    With `rows_from` (a `results.csv` of an earlier report of the same benchmark, e.g. the committed one) the runs it
    holds whole are taken as finished (`import_rows`): a fresh checkout continues where that report stopped.

    Returns:
        The summary dict (also written to `<out>/summary.json`); with `defer_fid`, the deferred description.
    """
    arms = [VANILLA, REPA, *ablations]
    probe = Job(REPA, preset.seeds[0], preset, config, tuple(overrides), str(out), data_root, ())
    depths = {arm.name: dataclasses.replace(probe, arm=arm, seed=0).train_config().model.align_depth for arm in arms}
    base_depth = depths["repa"]
    layers = tuple(sorted({base_depth, *(d for a, d in depths.items() if a != "vanilla")}))
    budget = {k: v for k, v in dataclasses.asdict(preset).items() if k not in ("seeds", "workers", "threads")}
    key = {"config": str(config), "overrides": list(overrides), "data_root": data_root, **budget}
    if report_only and rows_from is None and not (out / "benchmark.json").is_file():
        raise FileNotFoundError(f"{out}: no benchmark to report (no benchmark.json); run it first, or pass its --out")
    _check_out(out, {**key, "fid": "deferred"} if defer_fid else key)  # never mix deferred and scored runs
    jobs = [dataclasses.replace(probe, arm=arm, seed=seed, layers=layers, defer_fid=defer_fid)
            for seed in preset.seeds for arm in arms]  # fmt: skip
    if rows_from is not None:
        import_rows(Path(rows_from), jobs)
    t0, threads = time.perf_counter(), torch.get_num_threads()
    meta = {"preset": preset, "layers": layers, "base_depth": base_depth, "depths": depths, "command": command,
            "config": probe.train_config()}  # fmt: skip
    if report_only:
        return _report_finished(jobs, arms, out, meta)
    if defer_fid:
        from benchmarks.convergence import deferred

        deferred.write_description(out, arms=[a.name for a in arms], wall_s=None, **meta)
    try:
        torch.set_num_threads(max(1, preset.threads * preset.workers))
        evaluate.prepare_shared(out, meta["config"], preset, data_root, fid=not defer_fid)
        results = _run_jobs(jobs, preset, after_job=(lambda: deferred.pack(out)) if defer_fid else None)
    finally:
        torch.set_num_threads(threads)
    if defer_fid:
        desc = deferred.finish_description(out, wall_s=time.perf_counter() - t0)
        deferred.pack(out)
        return desc
    return _write_report(results, arms, out, {**meta, "wall_s": time.perf_counter() - t0})


def _write_report(results: Sequence[list[dict[str, Any]]], arms: Sequence[Arm], out: Path,
                  meta: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """`write_results` over the arms that have rows, with the s/step of `--time-steps` where it was run."""
    rows = [r for res in results for r in res]
    arms_with_rows = [a.name for a in arms if any(r["arm"] == a.name for r in rows)]
    return write_results(rows, arms_with_rows, out, {**meta, "step_times": read_step_times(out)})


def finished_rows(job: Job) -> list[dict[str, Any]] | None:
    """The evaluation rows of a run whose every evaluated step is written, else None."""
    paths = [job.eval_path(step) for step in eval_steps(job.preset)]
    return [json.loads(p.read_text()) for p in paths] if all(p.is_file() for p in paths) else None


def import_rows(path: Path, jobs: Sequence[Job]) -> list[str]:
    """Write the evaluation files of every run that `path` (a report's `results.csv`) holds at every evaluated step,
    unless the run already has them; returns the imported run names. Rows of unknown (arm, seed) pairs and runs
    missing a step are ignored. The caller checks that the folder's budget is the report's (`_check_out`)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.csv to import rows from")
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    derived = {"probe_acc", "cknna"}  # added by `write_results` from the base block's columns
    imported = []
    for job in jobs:
        rows = {int(r["step"]): r for r in table if r["arm"] == job.arm.name and int(r["seed"]) == job.seed}
        steps = eval_steps(job.preset)
        if set(steps) - set(rows) or finished_rows(job) is not None:
            continue
        for step in steps:
            row = {k: _csv_value(k, v) for k, v in rows[step].items() if k not in derived}
            write_json(row, job.eval_path(step), indent=1)
        imported.append(job.run_dir.name)
    print(f"[convergence] imported {len(imported)} finished runs from {path}: {', '.join(imported) or 'none'}",
          flush=True)  # fmt: skip
    return imported


def _csv_value(key: str, value: str) -> Any:
    """A `results.csv` cell as the evaluation file holds it (csv writes None as an empty cell)."""
    if key == "arm":
        return value
    if key in ("seed", "step"):
        return int(value)
    return None if value == "" else float(value)


def _report_finished(jobs: list[Job], arms: list[Arm], out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`run_benchmark(report_only=True)`: the report of the finished runs; the others are listed as remaining."""
    done = {job: finished_rows(job) for job in jobs}
    if all(res is None for job, res in done.items() if job.arm.name == "vanilla"):
        raise ValueError(f"{out}: no finished vanilla run yet: the report compares every arm against it")
    remaining = [f"{job.arm.name}-seed{job.seed}" for job, res in done.items() if res is None]
    meta = {**meta, "wall_s": None, "remaining": remaining}
    return _write_report([res for res in done.values() if res], arms, out, meta)


def _run_jobs(jobs: list[Job], preset: Preset, after_job=None) -> list[list[dict[str, Any]]]:
    """Run the jobs in this process, or in `preset.workers` spawned processes after building the shared caches;
    `after_job()` is called after each job run in this process."""
    if preset.workers <= 1:
        results = []
        for job in jobs:
            results.append(run_job(job))
            if after_job is not None:
                after_job()
        return results
    for cfg in {str(j.train_config().repa): j.train_config() for j in jobs if j.seed == preset.seeds[0]}.values():
        prepare_target_cache(cfg)
    blas = {k: str(preset.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    with temporary_environ(blas):  # the spawned workers' numpy/scipy BLAS threads
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(preset.workers, mp_context=ctx) as pool:
            return list(pool.map(run_job, jobs))
