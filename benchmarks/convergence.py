"""Convergence benchmark (issue #5): vanilla vs REPA on Fashion-MNIST, FID / linear probe / CKNNA vs training steps.

Every arm trains `configs/tiny.yaml` with identical model, data, seed, batch and budget; only the REPA settings
differ (vanilla: no encoder, lambda = 0). Checkpoints are written every `eval_every` steps and evaluated afterwards
(the loop resumes exactly, so this equals evaluating during training):

- FID: `fid_samples` EMA samples (Heun ODE, `sample_steps` steps, no CFG, class-balanced labels, the same noise for
  every arm and checkpoint) against the Inception statistics of the first `fid_reference` class-balanced
  Fashion-MNIST *test* images (computed once, cached under the repa cache). A small-N FID: comparable between arms
  and steps of one preset, not with FID-10k/50k numbers.
- Linear probe: test accuracy of a BatchNorm + linear probe on mean-pooled hidden tokens after block `align_depth`
  of the EMA model, inputs noised to t = 0.25 with the null label (REPA Sec. 3.2); `probe_train` train-split and
  `probe_test` test-split images.
- CKNNA (k = 10) between those pooled hidden states of the `probe_test` images and the mean-pooled patch tokens of
  the preset's target encoder (the REPA arm's, for every arm).

Outputs in `--out`: `results.csv` (one row per arm, seed, evaluated step), `results.md`, `convergence.png` (metric
vs steps, mean over seeds with a min-max band), `summary.json`; per-run folders under `runs/` hold checkpoints and
`evals/step_*.json`, so rerunning the same command resumes and reuses finished evaluations.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PROBE_T = 0.25  # the noise level of the probe / CKNNA features (t = 0 data, t = 1 noise)
CKNNA_K = 10
# Tr (S1 S2)^(1/2) by symmetric eigendecompositions: the same value as scipy's sqrtm (ADM) to ~1e-9, ~5x cheaper on
# 2048-d Inception features, and never complex when fewer samples than dimensions make S1 singular.
FID_METHOD = "eigh"
METRICS = {  # name -> (label, lower is better)
    "fid": ("FID", True),
    "probe_acc": ("linear-probe accuracy", False),
    "cknna": ("CKNNA", False),
}


@dataclass(frozen=True)
class Preset:
    """Budget of one benchmark run (see benchmarks/CONVERGENCE.md for how each was sized)."""

    steps: int
    eval_every: int
    batch_size: int
    num_train: int | None  # class-balanced training subset (tiny.yaml: 6000)
    fid_samples: int
    fid_reference: int
    sample_steps: int  # Heun steps of the FID sampler (2 * steps - 1 model evaluations)
    probe_train: int
    probe_test: int
    probe_epochs: int  # Adam, cosine schedule from `probe_lr` (nearly converged on these features, unlike 40 at 1e-3)
    seeds: tuple[int, ...]
    workers: int  # runs trained/evaluated in parallel processes
    threads: int  # torch threads per worker
    device: str
    eval_batch: int = 250
    probe_lr: float = 0.03


PRESETS: dict[str, Preset] = {
    # pipeline check only (2 evals, tiny N): its numbers carry no conclusion
    "smoke": Preset(
        steps=30,
        eval_every=15,
        batch_size=32,
        num_train=1000,
        fid_samples=50,
        fid_reference=200,
        sample_steps=5,
        probe_train=500,
        probe_test=200,
        probe_epochs=100,
        seeds=(0, 1),
        workers=2,
        threads=1,
        device="cpu",
        eval_batch=100,
    ),
    # <= 60 min on a quiet 2-core CPU: two single-threaded workers, 4 runs, 4 evals each
    "cpu": Preset(
        steps=1000,
        eval_every=250,
        batch_size=64,
        num_train=6000,
        fid_samples=500,
        fid_reference=2000,
        sample_steps=10,
        probe_train=3000,
        probe_test=1000,
        probe_epochs=200,
        seeds=(0, 1),
        workers=2,
        threads=1,
        device="cpu",
    ),
    # sized (not measured here: no GPU) for <= 8 min on one H100
    "gpu": Preset(
        steps=4000,
        eval_every=500,
        batch_size=256,
        num_train=20000,
        fid_samples=2000,
        fid_reference=10000,
        sample_steps=10,
        probe_train=5000,
        probe_test=1000,
        probe_epochs=200,
        seeds=(0, 1),
        workers=1,
        threads=4,
        device="cuda",
        eval_batch=500,
    ),
}

ABLATIONS = {  # --ablate KEY=V1,V2: one extra REPA arm per value
    "depth": ("model.align_depth", "repa-depth{}"),
    "lambda": ("repa.align_coeff", "repa-lambda{}"),
    "kind": ("repa.align_kind", "repa-{}"),
    "encoder": ("repa.encoders", "repa-{}"),
}
ABLATE_ALL = ("depth=1,4", "lambda=0.25,1.0", "kind=ntxent", "encoder=random-dinov2-vit-s")


@dataclass(frozen=True)
class Arm:
    """One training recipe: a name and the dotted overrides it applies on top of the base config."""

    name: str
    overrides: tuple[str, ...] = ()


VANILLA = Arm("vanilla", ("repa.encoders=[]", "repa.align_coeff=0.0"))
REPA = Arm("repa")


def parse_ablations(specs: Sequence[str]) -> list[Arm]:
    """`["depth=1,4", "kind=ntxent"]` (or `["all"]`) -> extra REPA arms, one setting changed each."""
    arms = []
    for spec in [s for item in specs for s in (ABLATE_ALL if item == "all" else (item,))]:
        key, _, values = spec.partition("=")
        if key not in ABLATIONS or not values:
            raise ValueError(f"--ablate {spec!r}: expected KEY=V1[,V2] with KEY in {sorted(ABLATIONS)}, or 'all'")
        field, name = ABLATIONS[key]
        for v in values.split(","):
            value = f"[{v}]" if key == "encoder" else v
            arms.append(Arm(name.format(v), (f"{field}={value}",)))
    return arms


# ------------------------------------------------------------------------------------------ curves and verdicts


def steps_to_reach(
    steps: Sequence[int], values: Sequence[float], target: float, lower_is_better: bool = True
) -> tuple[int | None, float | None]:
    """First evaluated step at which a curve reaches `target`, on the grid and linearly interpolated.

    Args:
        steps: evaluated steps, increasing.
        values: the metric at those steps.
        target: the level to reach (e.g. vanilla's final FID).
        lower_is_better: reaching means value <= target (FID) instead of value >= target (accuracy).

    Returns:
        (grid step, interpolated step): the grid step is the first evaluated step that reaches the target; the
        interpolated step solves the straight line through it and the previous evaluation for the target (the grid
        step itself when it is the first evaluation: nothing is known before it). (None, None) if never reached.
    """
    sign = 1.0 if lower_is_better else -1.0
    for i, (s, v) in enumerate(zip(steps, values)):
        if sign * (v - target) <= 0:
            if i == 0:
                return int(s), float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            frac = (v0 - target) / (v0 - v) if v0 != v else 1.0
            return int(s), float(s0 + frac * (s - s0))
    return None, None


def spread(values: Sequence[float]) -> float:
    """Seed spread of one arm at one step: max - min over seeds (0 for a single seed)."""
    return max(values) - min(values) if values else math.nan


def verdict(base: Sequence[float], other: Sequence[float], lower_is_better: bool) -> str:
    """Compare two arms' per-seed values: a mean difference within the larger seed spread is no result."""
    if min(len(base), len(other)) < 2:
        return "no result (one seed: no spread)"
    diff = statistics.mean(other) - statistics.mean(base)
    noise = max(spread(base), spread(other))
    if abs(diff) <= noise:
        return f"no result (mean diff {abs(diff):.3g} <= seed spread {noise:.3g})"
    better = (diff < 0) == lower_is_better
    return f"{'better' if better else 'worse'} (mean diff {abs(diff):.3g} > seed spread {noise:.3g})"


def _curves(rows: list[dict], arm: str, key: str) -> tuple[list[int], dict[int, list[float]]]:
    """{seed: values over steps} of one arm for one CSV column, on the steps every seed has."""
    by_seed: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["arm"] == arm and r.get(key) is not None:
            by_seed.setdefault(r["seed"], {})[r["step"]] = float(r[key])
    if not by_seed:
        return [], {}
    steps = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    return steps, {seed: [v[s] for s in steps] for seed, v in sorted(by_seed.items())}


def _seed_mean(curves: dict[int, list[float]], length: int) -> list[float]:
    """The seed-mean curve of `_curves`' per-seed values."""
    return [statistics.mean(v[i] for v in curves.values()) for i in range(length)]


def speedup(rows: list[dict], arm: str, base: str = "vanilla") -> dict[str, Any]:
    """Steps for `arm` to reach `base`'s final FID: on the seed-mean curves and per seed (paired by seed)."""
    steps_b, fid_b = _curves(rows, base, "fid")
    steps_a, fid_a = _curves(rows, arm, "fid")
    if not steps_b or not steps_a:
        return {}
    final = steps_b[-1]
    target = statistics.mean(v[-1] for v in fid_b.values())
    mean_a = _seed_mean(fid_a, len(steps_a))
    grid, interp = steps_to_reach(steps_a, mean_a, target)
    per_seed = {}
    for seed in sorted(set(fid_a) & set(fid_b)):
        g, _ = steps_to_reach(steps_a, fid_a[seed], fid_b[seed][-1])
        per_seed[seed] = final / g if g else None
    final_verdict = verdict([v[-1] for v in fid_b.values()], [v[-1] for v in fid_a.values()], True)
    is_result = final_verdict.startswith("better") and all(r is not None and r > 1 for r in per_seed.values())
    return {
        "target_fid": target, "base_final_step": final, "grid_step": grid, "interp_step": interp,
        "ratio_grid": final / grid if grid else None, "ratio_interp": final / interp if interp else None,
        "ratio_per_seed": per_seed, "final_fid_verdict": final_verdict,
        "verdict": "result" if is_result else "no result",
    }  # fmt: skip


def iso_fid_speedups(rows: list[dict], arm: str, base: str = "vanilla") -> list[dict[str, Any]]:
    """For every evaluated step of `base`: the (interpolated) step at which `arm`'s seed-mean FID first reaches
    `base`'s seed-mean FID there, and the ratio base step / arm step (the speed-up at that quality level).

    Returns:
        one dict per base step: base_step, target_fid, arm_step (None if never reached), ratio (None likewise),
        lower_bound: the level was reached at `arm`'s first evaluation, which has no earlier point to interpolate
        from, so arm_step is that evaluation and the ratio a lower bound.
    """
    steps_b, fid_b = _curves(rows, base, "fid")
    steps_a, fid_a = _curves(rows, arm, "fid")
    if not steps_b or not steps_a:
        return []
    mean_a = _seed_mean(fid_a, len(steps_a))
    out = []
    for step, target in zip(steps_b, _seed_mean(fid_b, len(steps_b))):
        _, at = steps_to_reach(steps_a, mean_a, target)
        out.append({"base_step": step, "target_fid": target, "arm_step": at, "ratio": step / at if at else None,
                    "lower_bound": at == steps_a[0]})  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------- data, features


def make_detector(device: torch.device):
    """The FID feature network (tests substitute a small stand-in)."""
    from repa.evaluation import InceptionDetector

    return InceptionDetector(classifier=None, device=device)


def fmnist_subset(split: str, num: int, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num // 10` images of each class of a Fashion-MNIST split: uint8 (N, 1, 28, 28), labels (N,)."""
    from repa.data.sources import fashion_mnist_images

    return fashion_mnist_images(split, num, root)


def fid_reference(detector, num: int, root: str | None):
    """Inception statistics of the class-balanced test subset, cached by (file content, detector) in the repa cache."""
    import numpy as np

    from repa.assets import cache_dir
    from repa.evaluation import reference_statistics

    images, _ = fmnist_subset("test", num, root)
    npz = cache_dir() / "eval" / f"fashion-mnist-test-balanced{len(images)}.npz"
    if not npz.is_file():  # an ADM-layout reference batch (RGB NHWC), reusable with `repa eval`
        npz.parent.mkdir(parents=True, exist_ok=True)
        tmp = npz.with_name(npz.stem + ".tmp.npz")
        np.savez(tmp, arr_0=images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy())
        tmp.replace(npz)
    return reference_statistics(npz, detector, use_precomputed=False, progress=True)


def _to_x(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0  # the loop's pixel-space x


@torch.no_grad()
def encoder_features(cfg, images: torch.Tensor, device: torch.device, batch: int = 250) -> torch.Tensor:
    """Mean-pooled patch tokens (N, D) of the config's first REPA encoder (the CKNNA target)."""
    from repa.training import setup as S

    encoder = S.build_encoders(cfg, device)[0]
    return torch.cat(
        [encoder(images[i : i + batch].to(device)).float().mean(1).cpu() for i in range(0, len(images), batch)]
    )


def prepare_target_cache(cfg) -> None:
    """Build the encoder-target cache of a REPA config once, before parallel workers would race to build it."""
    from repa.training import setup as S
    from repa.training.data import load_train_images

    if cfg.repa.enabled and cfg.repa.cache_targets:
        data = load_train_images(cfg)
        S.prepare_targets(cfg, data, S.build_encoders(cfg, torch.device("cpu")))


# ----------------------------------------------------------------------------------------------- one run (a job)


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

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / "runs" / f"{self.arm.name}-seed{self.seed}"

    def train_config(self):
        from repa.config import load_config

        p = self.preset
        evals = len(eval_steps(p))
        return load_config(self.config, [
            f"train.run_dir={self.run_dir}", f"train.seed={self.seed}", f"train.max_steps={p.steps}",
            f"train.global_batch_size={p.batch_size}", f"train.checkpoint_every={p.eval_every}",
            f"train.keep_checkpoints={evals + 1}", f"train.sample_every={p.steps}", "train.progress=false",
            f"train.num_threads={p.threads}", f"data.num_train={'null' if p.num_train is None else p.num_train}",
            "sample.num_images=20", *([f"data.root={self.data_root}"] if self.data_root else []),
            *self.overrides, *self.arm.overrides,
        ])  # fmt: skip


def eval_steps(p: Preset) -> list[int]:
    steps = list(range(p.eval_every, p.steps + 1, p.eval_every))
    return steps if steps and steps[-1] == p.steps else [*steps, p.steps]


def device_of(p: Preset) -> torch.device:
    return torch.device("cuda" if p.device == "cuda" and torch.cuda.is_available() else "cpu")


def evaluate_checkpoint(job: Job, ckpt: Path, shared: dict[str, Any], detector) -> dict[str, Any]:
    """FID, probe accuracy and CKNNA (per layer in `job.layers`) of one checkpoint's EMA model (the probe trains,
    so no global no_grad here; sampling and feature extraction run without gradients on their own)."""
    from repa.analysis import alignment, collect_hidden_states, linear_probe
    from repa.config import from_dict
    from repa.evaluation import balanced_labels, compute_activations, frechet_distance
    from repa.generate import decode_pixels, generate
    from repa.loading import load_official

    p, device = job.preset, device_of(job.preset)
    t0, c0 = time.perf_counter(), time.process_time()
    model, info = load_official(ckpt, prefer_ema=True)
    model.to(device)
    cfg = from_dict(info["config"])
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(
        cfg.sample, sampler="ode", heun=True, num_steps=p.sample_steps, cfg_scale=1.0))  # fmt: skip
    labels = balanced_labels(p.fid_samples, model.num_classes, seed=0)
    shape = tuple(shared["probe_test_images"].shape[1:])  # (1, 28, 28)

    def samples() -> Iterator[torch.Tensor]:
        for b, start in enumerate(range(0, len(labels), p.eval_batch)):  # same noise for every arm and checkpoint
            x = generate(model, cfg, labels[start : start + p.eval_batch], shape, seed=1000 + b)
            yield decode_pixels(x.cpu())

    acts = compute_activations(detector, samples(), len(labels), progress=False)
    mu, sigma = shared["fid_mu"].numpy(), shared["fid_sigma"].numpy()
    fid = frechet_distance(acts.stats["pool"].mean, acts.stats["pool"].cov, mu, sigma, method=FID_METHOD)
    feats = {}
    for split in ("train", "test"):
        x = _to_x(shared[f"probe_{split}_images"])
        feats[split] = collect_hidden_states(model, x.split(p.eval_batch), job.layers, [PROBE_T], seed=7)
    row: dict[str, Any] = {"fid": fid}
    for layer in job.layers:
        tr, te = feats["train"][(layer, PROBE_T)], feats["test"][(layer, PROBE_T)]
        res = linear_probe(tr, shared["probe_train_labels"], te, shared["probe_test_labels"], num_classes=10,
                           epochs=p.probe_epochs, lr=p.probe_lr, seed=0, device=device)  # fmt: skip
        row[f"probe_acc_l{layer}"] = res.test_acc
        row[f"cknna_l{layer}"] = alignment(te, shared["align_targets"], "cknna", k=CKNNA_K)
    row.update(eval_s=time.perf_counter() - t0, eval_cpu_s=time.process_time() - c0)
    return row


def _logged(run_dir: Path, step: int) -> dict[str, Any]:
    """Training losses at `step` (the last metrics.jsonl record at or before it) and the mean images/s so far."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    before = [r for r in records if r["step"] <= step]
    last = before[-1] if before else {}
    rates = [r["images_per_s"] for r in before if r.get("images_per_s")]
    return {"denoise": last.get("denoise"), "align": last.get("align"),
            "train_images_per_s": statistics.mean(rates) if rates else None}  # fmt: skip


def run_job(job: Job) -> list[dict[str, Any]]:
    """Train one (arm, seed) run to the preset's budget (resuming), then evaluate every saved eval step once."""
    from repa.checkpoint import list_checkpoints
    from repa.training import train

    torch.set_num_threads(job.preset.threads)
    shared = torch.load(Path(job.out) / "shared.pt", weights_only=True)  # tensors only (see `prepare_shared`)
    cfg = job.train_config()
    t0 = time.perf_counter()
    train(cfg)
    print(f"[convergence] {job.run_dir.name}: trained ({time.perf_counter() - t0:.0f} s)", flush=True)
    ckpts = {int(c.name.split("_")[-1]): c for c in list_checkpoints(job.run_dir / "checkpoints")}
    detector, rows = None, []
    for step in eval_steps(job.preset):
        out = job.run_dir / "evals" / f"step_{step:08d}.json"
        if out.is_file():
            row = json.loads(out.read_text())
        else:
            if step not in ckpts:
                raise FileNotFoundError(f"{job.run_dir}: no checkpoint for step {step}")
            detector = detector or make_detector(device_of(job.preset))
            row = {"arm": job.arm.name, "seed": job.seed, "step": step,
                   **evaluate_checkpoint(job, ckpts[step], shared, detector)}  # fmt: skip
            row.update(_logged(job.run_dir, step))
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(row, indent=1) + "\n")
            print(f"[convergence] {job.run_dir.name} step {step}: FID {row['fid']:.2f}, "
                  f"eval {row['eval_s']:.0f} s", flush=True)  # fmt: skip
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------ orchestration


def prepare_shared(job: Job) -> None:
    """Once per output folder: FID reference statistics, probe images, CKNNA targets -> `<out>/shared.pt`."""
    path = Path(job.out) / "shared.pt"
    if path.is_file():
        return
    p, device = job.preset, device_of(job.preset)
    ref = fid_reference(make_detector(device), p.fid_reference, job.data_root)
    mu, sigma = ref.stats["pool"]
    train_images, train_labels = fmnist_subset("train", p.probe_train, job.data_root)
    test_images, test_labels = fmnist_subset("test", p.probe_test, job.data_root)
    print(f"[convergence] CKNNA targets: encoder features of {len(test_images)} test images", flush=True)
    shared = {
        "fid_mu": torch.from_numpy(mu), "fid_sigma": torch.from_numpy(sigma),
        "probe_train_images": train_images, "probe_train_labels": train_labels,
        "probe_test_images": test_images, "probe_test_labels": test_labels,
        "align_targets": encoder_features(job.train_config(), test_images, device),
    }  # fmt: skip
    tmp = path.with_suffix(".tmp")
    torch.save(shared, tmp)
    tmp.replace(path)


def _check_out(out: Path, key: dict[str, Any]) -> None:
    """Refuse to mix results of different budgets in one folder (seeds and ablations may be added)."""
    meta = out / "benchmark.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old != key:
            raise ValueError(f"{out} holds a benchmark with other settings ({meta}); pass a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(key, indent=1) + "\n")


def run_benchmark(preset: Preset, *, out: Path, config: str, overrides: Sequence[str] = (),
                  ablations: Sequence[Arm] = (), data_root: str | None = None, command: str = "") -> dict[str, Any]:  # fmt: skip
    """Train and evaluate every (arm, seed), then write the CSV, markdown table, figure and summary.

    Returns:
        The summary dict (also written to `<out>/summary.json`).
    """
    arms = [VANILLA, REPA, *ablations]
    probe = Job(REPA, preset.seeds[0], preset, config, tuple(overrides), str(out), data_root, ())
    depths = {arm.name: Job(arm, 0, preset, config, tuple(overrides), str(out), data_root, ()).train_config()
              .model.align_depth for arm in arms}  # fmt: skip
    base_depth = depths["repa"]
    layers = tuple(sorted({base_depth, *(d for a, d in depths.items() if a != "vanilla")}))
    budget = {k: v for k, v in dataclasses.asdict(preset).items() if k not in ("seeds", "workers", "threads")}
    _check_out(out, {"config": str(config), "overrides": list(overrides), "data_root": data_root, **budget})
    jobs = [Job(arm, seed, preset, config, tuple(overrides), str(out), data_root, layers)
            for seed in preset.seeds for arm in arms]  # fmt: skip
    t0, threads = time.perf_counter(), torch.get_num_threads()
    try:
        torch.set_num_threads(max(1, preset.threads * preset.workers))
        prepare_shared(probe)
        results = _run_jobs(jobs, preset)
    finally:
        torch.set_num_threads(threads)
    rows = [{**r, "probe_acc": r[f"probe_acc_l{base_depth}"], "cknna": r[f"cknna_l{base_depth}"]}
            for res in results for r in res]  # fmt: skip
    meta = {"preset": preset, "layers": layers, "base_depth": base_depth, "depths": depths, "command": command,
            "wall_s": time.perf_counter() - t0, "config": probe.train_config()}  # fmt: skip
    return write_results(rows, [a.name for a in arms], out, meta)


def _run_jobs(jobs: list[Job], preset: Preset) -> list[list[dict[str, Any]]]:
    """Run the jobs in this process, or in `preset.workers` spawned processes after building the shared caches."""
    if preset.workers > 1:
        import concurrent.futures
        import multiprocessing

        from benchmarks.convergence import run_job as worker  # picklable by name, also under `python -m`

        for cfg in {str(j.train_config().repa): j.train_config() for j in jobs if j.seed == preset.seeds[0]}.values():
            prepare_target_cache(cfg)
        blas = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        saved = {k: os.environ.get(k) for k in blas}
        os.environ.update({k: str(preset.threads) for k in blas})  # the spawned workers' numpy/scipy BLAS threads
        try:
            with concurrent.futures.ProcessPoolExecutor(
                preset.workers, mp_context=multiprocessing.get_context("spawn")
            ) as pool:
                return list(pool.map(worker, jobs))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return [run_job(job) for job in jobs]


# ------------------------------------------------------------------------------------------------------ reporting


def _fmt(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    return (
        f"{mean:.{digits}g}"
        if len(values) == 1
        else f"{mean:.{digits}g} [{min(values):.{digits}g}, {max(values):.{digits}g}]"
    )


def metric_table(rows: list[dict], key: str, arm: str, base: str = "vanilla") -> list[str]:
    """Markdown rows: step | base | arm | diff | verdict, for one metric."""
    label, lower = METRICS[key]
    steps_b, vb = _curves(rows, base, key)
    steps_a, va = _curves(rows, arm, key)
    lines = [f"| step | {base} | {arm} | diff ({arm} - {base}) | verdict ({label}) |", "|---:|---|---|---:|---|"]
    for step in (s for s in steps_a if s in steps_b):
        b = [v[steps_b.index(step)] for v in vb.values()]
        a = [v[steps_a.index(step)] for v in va.values()]
        diff = statistics.mean(a) - statistics.mean(b)
        lines.append(f"| {step} | {_fmt(b)} | {_fmt(a)} | {diff:+.4g} | {verdict(b, a, lower)} |")
    return lines


def plot(rows: list[dict], arms: list[str], path: Path, title: str) -> None:
    """Metric vs training steps, one line per arm (mean over seeds) with a min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.8))
    for ax, (key, (label, lower)) in zip(axes, METRICS.items()):
        for arm in arms:
            steps, curves = _curves(rows, arm, key)
            if not steps:
                continue
            cols = list(zip(*curves.values()))
            mean = [statistics.mean(c) for c in cols]
            ax.plot(steps, mean, marker="o", label=f"{arm} ({len(curves)} seeds)")
            ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_title(f"{label} ({'lower' if lower else 'higher'} is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(p: Preset, cfg, d0: int, seeds: Sequence[int]) -> str:
    """One paragraph stating exactly what was trained and measured."""
    enc = f"{cfg.repa.encoders[0]} (block {cfg.repa.encoder_layer}, {cfg.repa.encoder_resolution} px)"
    return (
        f"{cfg.model.name} on Fashion-MNIST ({p.num_train or 'all'} training images, pixel space), batch {p.batch_size}, "
        f"{p.steps} steps, lr {cfg.optim.lr:g}, seeds {','.join(map(str, seeds))}; REPA: {enc}, lambda "
        f"{cfg.repa.align_coeff:g}, block {d0}, {cfg.repa.align_kind}. Evaluated every {p.eval_every} steps on the EMA "
        f"model. FID: {p.fid_samples} samples (Heun ODE {p.sample_steps} steps, no CFG, same noise everywhere) vs "
        f"Inception statistics of {p.fid_reference} Fashion-MNIST test images (a small-N FID: compare only within "
        f"this table). Probe: BatchNorm + linear layer, Adam lr {p.probe_lr:g} cosine, {p.probe_epochs} epochs, on mean-pooled block-{d0} tokens at "
        f"t = {PROBE_T} with the null label, {p.probe_train} train / {p.probe_test} test images. CKNNA: k = {CKNNA_K}, "
        f"same {p.probe_test} test images, vs mean-pooled {enc} tokens."
    )


SPEEDUP_HELP = (
    "Grid step = the first evaluated step whose seed-mean FID is <= vanilla's final seed-mean FID (the primary "
    "number; a lower bound on the speed-up when the curves decrease monotonically); interpolated = on the straight "
    "line between that evaluation and the previous one. Per-seed ratios pair REPA seed s with vanilla seed s. "
    "Verdict: a result only if REPA's final FID beats vanilla's by more than the seed spread and every seed reaches "
    "its vanilla target before the final step."
)


def speedup_section(rows: list[dict], arms: list[str], summary: dict, printed: list[str]) -> list[str]:
    """Markdown for the steps-to-reach table; fills `summary` and the lines to print."""
    md = ["## Steps to reach vanilla's final FID", "", SPEEDUP_HELP, "",
          "| arm | target FID | grid step | interpolated | speed-up (grid) | speed-up (interp.) | per seed (grid) "
          "| verdict |", "|---|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for arm in arms[1:]:
        sp = speedup(rows, arm)
        summary.setdefault(arm, {})["speedup"] = sp
        if not sp:
            continue
        per_seed = ", ".join(
            f"s{k}: {'not reached' if r is None else f'{r:.2f}x'}" for k, r in sp["ratio_per_seed"].items()
        )
        ratio = "not reached" if sp["ratio_grid"] is None else f"{sp['ratio_grid']:.2f}x"
        ratio_i = "-" if sp["ratio_interp"] is None else f"{sp['ratio_interp']:.2f}x"
        interp = "-" if sp["interp_step"] is None else round(sp["interp_step"])
        md.append(f"| {arm} | {sp['target_fid']:.4g} | {sp['grid_step'] or '-'} | {interp} | {ratio} | {ratio_i} | "
                  f"{per_seed} | **{sp['verdict']}**; final FID: {sp['final_fid_verdict']} |")  # fmt: skip
        printed.append(f"[convergence] {arm}: reaches vanilla's final FID {sp['target_fid']:.4g} at step "
                       f"{sp['grid_step'] or 'never'} (grid; interpolated {interp}) -> speed-up {ratio}; per seed "
                       f"{per_seed}; VERDICT: {sp['verdict']}")  # fmt: skip
    md += ["", "**Speed-up at every vanilla checkpoint** (seed means): the step at which each arm first reaches "
           "vanilla's FID at that checkpoint, interpolated linearly between evaluations; ratio = vanilla step / "
           "arm step. A level reached at the arm's first evaluation gives a lower bound (marked >=).", ""]  # fmt: skip
    curves = {arm: iso_fid_speedups(rows, arm) for arm in arms[1:]}
    base_steps = [c["base_step"] for c in next(iter(curves.values()), [])]
    md += ["| arm | " + " | ".join(f"vanilla step {s}" for s in base_steps) + " |",
           "|---|" + "---:|" * len(base_steps)]  # fmt: skip
    for arm, curve in curves.items():
        summary.setdefault(arm, {})["iso_fid_speedups"] = curve
        cells = [
            "not reached" if c["arm_step"] is None
            else f"{'>=' if c['lower_bound'] else ''}{c['ratio']:.2f}x (step {round(c['arm_step'])})"
            for c in curve
        ]  # fmt: skip
        md.append(f"| {arm} | " + " | ".join(cells) + " |")
    return md


def _finals(rows: list[dict], arm: str, key: str) -> list[float]:
    return [c[-1] for c in _curves(rows, arm, key)[1].values()]


def per_step_section(
    rows: list[dict], arm: str, d0: int, own: int | None, summary: dict, printed: list[str]
) -> list[str]:
    """Markdown per-step tables of every metric for `arm` vs vanilla, with final-step verdicts."""
    md = ["", f"## {arm} vs vanilla, per evaluated step", ""]
    for key, (label, lower) in METRICS.items():
        base, other = _finals(rows, "vanilla", key), _finals(rows, arm, key)
        if not base or not other:
            continue
        md += [f"**{label}**{'' if key == 'fid' else f' (block {d0})'}", "", *metric_table(rows, key, arm), ""]
        v = verdict(base, other, lower)
        summary.setdefault(arm, {})[key] = {"vanilla_final": base, "final": other, "final_verdict": v}
        printed.append(f"[convergence] {arm} vs vanilla, final {label}: {_fmt(base)} -> {_fmt(other)}: VERDICT: {v}")
    if own is not None and own != d0:  # a depth ablation: also at the block it aligns
        p = [_fmt(_finals(rows, a, f"probe_acc_l{own}")) for a in ("vanilla", arm)]
        c = [_fmt(_finals(rows, a, f"cknna_l{own}")) for a in ("vanilla", arm)]
        md += [f"At its own alignment block {own} (final step, vanilla -> {arm}): probe {p[0]} -> {p[1]}; "
               f"CKNNA {c[0]} -> {c[1]}.", ""]  # fmt: skip
    return md


def ablation_section(rows: list[dict], arm: str, summary: dict, printed: list[str]) -> list[str]:
    """Markdown per-step tables of an ablation arm against the REPA arm it varies (same verdict rule)."""
    md = ["", f"## {arm} vs repa (the ablation against the default REPA arm), per evaluated step", ""]
    for key, (label, lower) in METRICS.items():
        base, other = _finals(rows, "repa", key), _finals(rows, arm, key)
        if not base or not other:
            continue
        md += [f"**{label}**", "", *metric_table(rows, key, arm, base="repa"), ""]
        v = verdict(base, other, lower)
        summary.setdefault(arm, {})[f"{key}_vs_repa"] = {"repa_final": base, "final": other, "final_verdict": v}
        printed.append(f"[convergence] {arm} vs repa, final {label}: {_fmt(base)} -> {_fmt(other)}: VERDICT: {v}")
    return md


def cost_section(rows: list[dict], arms: list[str], p: Preset, wall_s: float) -> list[str]:
    md = [
        "## Measured cost",
        "",
        "| arm | train s/step (from logged images/s) | eval s per checkpoint |",
        "|---|---:|---:|",
    ]
    for arm in arms:
        ips = [r["train_images_per_s"] for r in rows if r["arm"] == arm and r.get("train_images_per_s")]
        ev = [r["eval_s"] for r in rows if r["arm"] == arm]
        step_s = f"{p.batch_size / statistics.mean(ips):.3f}" if ips else "-"
        md.append(f"| {arm} | {step_s} | {statistics.mean(ev):.1f} |" if ev else f"| {arm} | {step_s} | - |")
    return md + [
        "",
        f"Wall time of this invocation: {wall_s / 60:.1f} min (finished runs and evaluations are reused).",
        "",
    ]


def write_results(rows: list[dict], arms: list[str], out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`results.csv`, `results.md`, `convergence.png`, `summary.json`; prints the verdicts. Returns the summary."""
    p: Preset = meta["preset"]
    d0 = meta["base_depth"]
    rows = sorted(rows, key=lambda r: (arms.index(r["arm"]), r["seed"], r["step"]))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    setup = describe(p, meta["config"], d0, sorted({r["seed"] for r in rows}))
    per_arm: dict[str, Any] = {}
    printed = [f"[convergence] {setup}"]
    md = [f"# Convergence: vanilla vs REPA (preset `{_preset_name(p)}`)", ""]
    md += [f"Command: `{meta['command']}`", ""] if meta["command"] else []
    md += [setup, "", "Values: mean over seeds [min, max]. Verdict: a mean difference not larger than the seed "
           "spread (the larger of the two arms' max - min over seeds) is **no result**.", ""]  # fmt: skip
    md += speedup_section(rows, arms, per_arm, printed)
    for arm in arms[1:]:
        md += per_step_section(rows, arm, d0, meta["depths"].get(arm), per_arm, printed)
    if "repa" in arms:
        for arm in (a for a in arms[1:] if a != "repa"):
            md += ablation_section(rows, arm, per_arm, printed)
    md += [*cost_section(rows, arms, p, meta["wall_s"]), "![convergence](convergence.png)", ""]
    (out / "results.md").write_text("\n".join(md))
    plot(
        rows,
        arms,
        out / "convergence.png",
        f"{_preset_name(p)} preset: {p.steps} steps, {len({r['seed'] for r in rows})} seeds, FID-{p.fid_samples}",
    )
    summary = {"setup": setup, "command": meta["command"], "wall_s": meta["wall_s"], "rows": len(rows), "arms": per_arm}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    for line in printed:
        print(line, flush=True)
    print(f"[convergence] wrote {out / 'results.csv'}, results.md, convergence.png, summary.json", flush=True)
    return summary


def _preset_name(p: Preset) -> str:
    return next((name for name, q in PRESETS.items() if q == p), "custom")


# ------------------------------------------------------------------------------------------------- budget estimate


def _timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of `fn()` after one warm-up: process CPU time when single-threaded on CPU (robust to other
    load on the machine), else wall time."""
    cpu = device.type == "cpu" and torch.get_num_threads() == 1
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.process_time() if cpu else time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.process_time() if cpu else time.perf_counter()) - t0)
    return statistics.median(times)


def _model_like(cfg, encoder_dims: list[int]) -> torch.nn.Module:
    """The config's diffusion transformer for 28x28 grayscale, 10 classes (for timing only)."""
    from repa.models import build_model

    m = cfg.model
    sizes = {k: getattr(m, k) for k in ("hidden_size", "depth", "num_heads", "mlp_ratio", "align_depth")}
    return build_model(m.name, input_size=28, in_channels=1, num_classes=10, class_dropout_prob=m.class_dropout_prob,
                       encoder_dims=encoder_dims, projector_dim=m.projector_dim, qk_norm=m.qk_norm,
                       **{k: v for k, v in sizes.items() if v is not None})  # fmt: skip


def _timed_fid() -> float:
    """Seconds of one 2048-d Fréchet distance (process CPU time, all BLAS threads included)."""
    import numpy as np

    from repa.evaluation import frechet_distance

    a = np.random.default_rng(0).standard_normal((2048, 2048))
    sigma, mu = a @ a.T / 2048, np.zeros(2048)
    t0 = time.process_time()
    frechet_distance(mu, sigma, mu + 1, sigma, method=FID_METHOD)
    return time.process_time() - t0


def estimate(preset: Preset, config: str, overrides: Sequence[str] = (), data_root: str | None = None) -> dict:
    """Measure one training step (vanilla, REPA), one model forward per image, Inception and encoder cost per image,
    and project the preset's wall time (workers run in parallel; nothing is trained or written)."""
    from repa.training import setup as S
    from repa.training.batches import step_draws
    from repa.training.data import load_train_images

    torch.set_num_threads(preset.threads)
    device = device_of(preset)
    job = Job(REPA, 0, preset, config, tuple(overrides), "/nonexistent", data_root, ())
    cfg = job.train_config()
    data = load_train_images(cfg)
    encoder = S.build_encoders(cfg, device)[0]
    cost: dict[str, float] = {}
    b = data.batch(torch.arange(preset.batch_size) % data.num_items, torch.zeros(preset.batch_size, dtype=torch.bool),
                   device)  # fmt: skip
    d = step_draws(0, 0, 0, preset.batch_size, data.sample_shape, 0.1)
    for arm, cfg_arm in (("vanilla", dataclasses.replace(job, arm=VANILLA).train_config()), ("repa", cfg)):
        torch.manual_seed(0)
        model = _model_like(cfg_arm, [encoder.embed_dim] if cfg_arm.repa.enabled else []).to(device)
        loss_fn = S.build_loss(cfg_arm)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        targets = [encoder(b["images"])] if cfg_arm.repa.enabled else None

        def step(model=model, loss_fn=loss_fn, opt=opt, targets=targets, cfg_arm=cfg_arm):
            terms = loss_fn(model, b["x"], b["y"], targets, t=S.loss_time(cfg_arm, d["u"].to(device)),
                            noise=d["noise"].to(device), model_kwargs={"force_drop_ids": d["drop"].to(device).long()})  # fmt: skip
            terms["total"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        cost[f"train_step_{arm}"] = _timed(step, 4, device)
    model.eval()
    x, n = b["x"][: min(64, preset.batch_size)], min(64, preset.batch_size)
    t, y = torch.full((n,), 0.5, device=device), b["y"][:n]
    with torch.no_grad():
        cost["model_forward_per_image"] = _timed(lambda: model(x, t, y, project=False), 4, device) / n
        images = data.images[:16].expand(-1, 3, -1, -1).contiguous()
        detector = make_detector(device)
        cost["inception_per_image"] = _timed(lambda: detector.features(images), 2, device) / 16
        cost["encoder_per_image"] = _timed(lambda: encoder(data.images[:32].to(device)), 2, device) / 32
    cost["frechet_distance"] = _timed_fid()
    nfe = 2 * preset.sample_steps - 1
    per_eval = (preset.fid_samples * (nfe * cost["model_forward_per_image"] + cost["inception_per_image"])
                + (preset.probe_train + preset.probe_test) * cost["model_forward_per_image"]
                + cost["frechet_distance"])  # fmt: skip
    n_evals = len(eval_steps(preset))
    per_run = {arm: preset.steps * cost[f"train_step_{arm}"] + n_evals * per_eval for arm in ("vanilla", "repa")}
    one_time = (preset.fid_reference * cost["inception_per_image"]
                + ((preset.num_train or 60000) + preset.probe_test) * cost["encoder_per_image"]) / preset.workers  # fmt: skip
    rounds = math.ceil(2 * len(preset.seeds) / preset.workers)
    total = one_time + rounds * max(per_run.values())  # a round: `workers` runs side by side
    projection = {"per_eval_s": per_eval, "evals_per_run": n_evals, "per_run_s": per_run,
                  "one_time_s": one_time, "runs": 2 * len(preset.seeds), "workers": preset.workers, "total_s": total}  # fmt: skip
    clock = "process CPU time (1 thread)" if device.type == "cpu" and preset.threads == 1 else "wall time"
    print(f"[convergence] measured ({clock}, {preset.threads} thread(s), {device}):")
    for k, v in cost.items():
        print(f"  {k:>26s}: {v:.4f} s")
    print(f"[convergence] projection for {2 * len(preset.seeds)} runs on {preset.workers} worker(s), no ablations: "
          f"one eval {per_eval:.0f} s, one run {max(per_run.values()):.0f} s ({preset.steps} steps + {n_evals} evals), "
          f"one-time {one_time:.0f} s -> total {total / 60:.1f} min (+ ~1 min start-up per run)")  # fmt: skip
    return {"cost": cost, "projection": projection}


# ------------------------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `python -m benchmarks.convergence` and `repa bench convergence`."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="budget (default: cpu)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the preset's, 0,1)")
    p.add_argument("--out", default=None, help="output folder (default: runs/bench-convergence-<preset>)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="base preset for every arm")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: the usual search)")
    p.add_argument("--ablate", action="append", default=[], metavar="KEY=V1[,V2]",
                   help="extra REPA arms: depth=1,4 | lambda=0.25,1.0 | kind=ntxent | "
                        "encoder=random-dinov2-vit-s | all (repeatable)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every arm (repeatable)")  # fmt: skip
    for name in ("steps", "eval-every", "fid-samples", "workers", "threads"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset's value")
    p.add_argument("--estimate", action="store_true", help="measure costs and project the wall time; train nothing")


def resolve_preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    changes = {k: getattr(args, k) for k in ("steps", "eval_every", "fid_samples", "workers", "threads")}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in str(args.seeds).split(",") if s.strip())
    preset = dataclasses.replace(preset, **changes)
    if preset.eval_every < 1 or preset.steps < preset.eval_every or preset.workers < 1 or not preset.seeds:
        raise ValueError("need steps >= eval_every >= 1, workers >= 1 and at least one seed")
    return preset


def run(args: argparse.Namespace) -> int:
    preset = resolve_preset(args)
    if args.estimate:
        estimate(preset, args.config, args.overrides, args.data_root)
        return 0
    out = Path(args.out or f"runs/bench-convergence-{args.preset}")
    argv = getattr(args, "argv", None)  # set by `main`; absent under `repa bench convergence`
    command = " ".join(["python -m benchmarks.convergence", *argv] if argv is not None else ["repa", *sys.argv[1:]])
    run_benchmark(preset, out=out, config=args.config, overrides=args.overrides,
                  ablations=parse_ablations(args.ablate), data_root=args.data_root, command=command.strip())  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
