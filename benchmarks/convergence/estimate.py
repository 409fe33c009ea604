"""`--estimate`: measure the cost of one training step, sampling, Inception and encoder features on this machine,
and project a preset's wall time (nothing is trained or written)."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from benchmarks.convergence import evaluate
from benchmarks.convergence.jobs import Job
from benchmarks.convergence.presets import FID_METHOD, REPA, VANILLA, Preset, device_of, eval_steps
from repa.evaluation import frechet_distance
from repa.training.batches import step_draws
from repa.training.data import load_train_images
from repa.training.setup import build_encoders, build_loss, build_model, loss_time


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


def _timed_fid() -> float:
    """Seconds of one 2048-d Fréchet distance (process CPU time, all BLAS threads included)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048))
    sigma, mu = a @ a.T / 2048, np.zeros(2048)
    t0 = time.process_time()
    frechet_distance(mu, sigma, mu + 1, sigma, method=FID_METHOD)
    return time.process_time() - t0


def estimate(preset: Preset, config: str, overrides: Sequence[str] = (), data_root: str | None = None) -> dict:
    """Measure one training step (vanilla, REPA), one model forward per image, Inception and encoder cost per image,
    and project the preset's wall time (workers run in parallel; nothing is trained or written)."""
    torch.set_num_threads(preset.threads)
    device = device_of(preset)
    job = Job(REPA, 0, preset, config, tuple(overrides), "/nonexistent", data_root, ())
    cfg = job.train_config()
    data = load_train_images(cfg)
    encoder = build_encoders(cfg, device)[0]
    specs = [(encoder.name, encoder.embed_dim, tuple(encoder.token_grid))]
    cost: dict[str, float] = {}
    b = data.batch(torch.arange(preset.batch_size) % data.num_items, torch.zeros(preset.batch_size, dtype=torch.bool),
                   device)  # fmt: skip
    d = step_draws(0, 0, 0, preset.batch_size, data.sample_shape, 0.1)
    for arm, cfg_arm in (("vanilla", dataclasses.replace(job, arm=VANILLA).train_config()), ("repa", cfg)):
        torch.manual_seed(0)
        model = build_model(cfg_arm, data, specs if cfg_arm.repa.enabled else []).to(device)
        loss_fn = build_loss(cfg_arm)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        targets = [encoder(b["images"])] if cfg_arm.repa.enabled else None

        def step(model=model, loss_fn=loss_fn, opt=opt, targets=targets, cfg_arm=cfg_arm):
            terms = loss_fn(model, b["x"], b["y"], targets, t=loss_time(cfg_arm, d["u"].to(device)),
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
        detector = evaluate.make_detector(device)
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
