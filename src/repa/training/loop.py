"""`train(cfg)`: the REPA training loop on Hugging Face Accelerate, readable top to bottom."""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from repa import distributed as D
from repa.config import Config, dump_config, to_dict, validate
from repa.training import setup as S
from repa.training.batches import GlobalOrder, MicroBatchPlan, step_draws
from repa.training.checkpoint import (
    check_writable,
    load_latest_checkpoint,
    save_checkpoint,
    trim_metrics,
    write_error_reason,
)
from repa.training.data import load_train_images
from repa.training.ema import EMA


class NonFiniteError(RuntimeError):
    """Too many steps with NaN/inf loss or gradients."""


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def train(cfg: Config) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data` with (or without) REPA; resume from `cfg.train.run_dir` if it holds a
    checkpoint. Returns a summary dict (run_dir, step, last logged metrics)."""
    tc = cfg.train
    acc = D.make_accelerator(tc.mixed_precision)
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    validate(cfg, world_size=world)
    if tc.mixed_precision == "fp16" and device.type == "cpu":  # Accelerate would silently run fp32, no loss scaling
        raise ValueError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 (or no)")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.allow_tf32
        torch.backends.cudnn.allow_tf32 = tc.allow_tf32
    run_dir = Path(tc.run_dir)
    if acc.is_main_process:
        check_writable(run_dir)  # a read-only or full disk fails here, before any work
        (run_dir / "samples").mkdir(exist_ok=True)
    acc.wait_for_everyone()

    # ---- data, encoders, targets, model, loss
    data = load_train_images(cfg)
    encoders = S.build_encoders(cfg, device) if S.needs_encoders(cfg, data) else []
    torch.manual_seed(tc.seed)  # the initial weights are a function of the seed (identical on every rank)
    # checks align depth / token grids before any target is computed
    model = S.build_model(cfg, data, S.target_specs(cfg, data, encoders)).to(device)
    S.prepare_targets(cfg, data, encoders, acc)  # fills data.targets when cached; no-op for vanilla / online
    online_encoders = S.online_encoders(data, encoders)
    loss_fn = S.build_loss(cfg)
    ema = EMA(model, cfg.optim.ema_decay, warmup=cfg.optim.ema_warmup)
    # fused AdamW (one kernel over all tensors) where torch has it: on the 2-core CPU, SiT-B/2's update takes
    # 0.06 s fused vs 0.16 s per-parameter and 0.31 s foreach (`python -m benchmarks.micro`); same algorithm
    fused = device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, fused=fused, foreach=None if fused else True,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.optim.warmup_steps))

    # ---- resume: rerunning the same command continues from the newest complete checkpoint
    start_step, nonfinite, overflow = 0, 0, 0
    ckpt_path, ckpt = load_latest_checkpoint(run_dir / "checkpoints")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"]["optimizer"])
        sched.load_state_dict(ckpt["optimizer"]["scheduler"])
        start_step = int(ckpt["state"]["step"])
        nonfinite = int(ckpt["state"].get("nonfinite_steps", 0))
        if acc.scaler is not None and "scaler" in ckpt["optimizer"]:
            acc.scaler.load_state_dict(ckpt["optimizer"]["scaler"])
        if nonfinite > tc.max_nonfinite_steps:  # the run stopped on NaN/inf; a rerun gets a fresh allowance
            D.print0(f"[repa] the previous run stopped after {nonfinite} non-finite steps; counting again from 0")
            nonfinite = 0
        D.print0(f"[repa] resuming from {ckpt_path} (step {start_step})")
    if acc.is_main_process:
        dump_config(cfg, run_dir / "config.yaml")
        trim_metrics(run_dir / "metrics.jsonl", start_step)  # replayed steps are logged again; drop torn lines

    model, opt = acc.prepare(model, opt)
    raw_model = acc.unwrap_model(model)
    if tc.compile:
        model = S.compile_model(model, tc.compile_memory_budget)

    local_batch = tc.global_batch_size // (world * tc.grad_accum_steps)
    plan = MicroBatchPlan(local_batch, world, rank, tc.grad_accum_steps)
    order = GlobalOrder(data.num_items, tc.seed, cfg.data.hflip)
    if acc.is_main_process and start_step == 0:
        n_params = sum(p.numel() for p in raw_model.parameters())
        D.print0(f"[repa] {cfg.model.name}: {n_params / 1e6:.2f}M parameters, {data.num_items} training items, "
                 f"global batch {tc.global_batch_size} on {world} process(es), REPA {'on' if cfg.repa.enabled else 'off'}")  # fmt: skip

    metrics_file = run_dir / "metrics.jsonl"
    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not (tc.progress and acc.is_main_process),
               desc="train", dynamic_ncols=True)  # fmt: skip
    sums: dict[str, torch.Tensor] = {}
    last: dict[str, Any] = {}
    window_start, window_steps, window_good = time.perf_counter(), 0, 0
    model.train()
    for step in range(start_step, tc.max_steps):
        terms, grad_norm = _train_step(cfg, model, loss_fn, opt, acc, data, order, plan, step, online_encoders)
        loss_finite = all(bool(torch.isfinite(v)) for v in terms.values())
        finite = loss_finite and bool(torch.isfinite(grad_norm))
        if finite:
            opt.step()
            sched.step()
            ema.update(raw_model, step)
        elif loss_finite and acc.scaler is not None:
            opt.step()  # the GradScaler skips this overflowed update and lowers its scale
            overflow += 1
        else:
            nonfinite += 1
            D.print0(f"[repa] step {step}: non-finite loss or gradient, update skipped ({nonfinite} so far)")
        opt.zero_grad(set_to_none=True)
        for k, v in {**terms, "grad_norm": grad_norm}.items():
            sums[k] = sums.get(k, 0.0) + (v.detach() if finite else torch.zeros_like(v))
        window_steps += 1
        window_good += int(finite)  # skipped steps add zeros: average over the others
        done = step + 1
        bar.update(1)

        if done % tc.log_every == 0 or done == tc.max_steps:
            elapsed = time.perf_counter() - window_start
            good = max(1, window_good)
            record = {"step": done, **{k: float(D.all_reduce_mean(v)) / good for k, v in sums.items()}}
            record.update(lr=sched.get_last_lr()[0], images_per_s=window_steps * tc.global_batch_size / elapsed,
                          peak_memory_gb=_peak_memory_gb(device), nonfinite_steps=nonfinite,
                          fp16_overflow_steps=overflow)  # fmt: skip
            if acc.is_main_process:
                with (
                    _reported_write(metrics_file, "the metrics log", run_dir),
                    open(metrics_file, "a", encoding="utf-8") as f,
                ):
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix({k: f"{record[k]:.4f}" for k in ("denoise", "align") if k in record})
            last, sums, window_start, window_steps, window_good = record, {}, time.perf_counter(), 0, 0
        if nonfinite > tc.max_nonfinite_steps:
            _save(cfg, acc, raw_model, ema, opt, sched, done, nonfinite)
            raise NonFiniteError(
                f"{nonfinite} steps had non-finite loss or gradients (train.max_nonfinite_steps="
                f"{tc.max_nonfinite_steps}); stopped at step {done} with a checkpoint in {run_dir / 'checkpoints'}. "
                "Lower optim.lr, use bf16 instead of fp16, or check the data."
            )
        if done % tc.sample_every == 0 or done == tc.max_steps:
            if acc.is_main_process:
                grid = run_dir / "samples" / f"step_{done:08d}.png"
                with _reported_write(grid, "the sample grid", run_dir):
                    S.sample_grid(cfg, ema.model, data, grid)
            acc.wait_for_everyone()
        if done % tc.checkpoint_every == 0 or done == tc.max_steps:
            _save(cfg, acc, raw_model, ema, opt, sched, done, nonfinite)
    bar.close()
    acc.wait_for_everyone()
    return {"run_dir": str(run_dir), "step": max(start_step, tc.max_steps), "metrics": last}


def _train_step(cfg, model, loss_fn, opt, acc, data, order, plan, step, online_encoders):
    """Forward/backward over the micro-batches of one optimizer step; returns (mean loss terms, grad norm)."""
    tc = cfg.train
    totals: dict[str, torch.Tensor] = {}
    for micro in range(tc.grad_accum_steps):
        idx, flips = order.take(plan.position(step, micro), plan.global_micro)
        posterior = S.is_shards(data)  # latents are a fresh VAE posterior sample each step
        draws = step_draws(tc.seed, step, micro, plan.global_micro, data.sample_shape, cfg.model.class_dropout_prob,
                           posterior=posterior)  # fmt: skip
        sl = plan.local_slice()
        batch = data.batch(idx[sl], flips[sl], acc.device, eps=draws["eps"][sl] if posterior else None)
        targets = batch.get("targets")
        if online_encoders:
            with torch.no_grad(), acc.autocast():
                targets = [enc(batch["images"]) for enc in online_encoders]
        sync = micro == tc.grad_accum_steps - 1
        ctx = acc.no_sync(model) if not sync and acc.num_processes > 1 else _null()
        with ctx:
            with acc.autocast():
                terms = loss_fn(
                    model, batch["x"], batch["y"], targets,
                    u=draws["u"][sl].to(acc.device), noise=draws["noise"][sl].to(acc.device),
                    drop=draws["drop"][sl].to(acc.device),
                )  # fmt: skip
            acc.backward(terms["total"] / tc.grad_accum_steps)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + v.detach().float() / tc.grad_accum_steps
    if cfg.optim.grad_clip > 0:
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None])
        )
    return totals, torch.as_tensor(grad_norm, dtype=torch.float32).detach()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@contextlib.contextmanager
def _reported_write(path: Path, what: str, run_dir: Path) -> Iterator[None]:
    """An OSError while writing a log or image (full disk, read-only or vanished folder) names the file, the
    reason and what is safe: checkpoints are written atomically, so the newest complete one is intact and
    rerunning the same command resumes from it."""
    try:
        yield
    except OSError as e:
        raise OSError(
            e.errno,
            f"could not write {what} {path}: {write_error_reason(e, path.parent)}. The newest complete checkpoint "
            f"in {run_dir / 'checkpoints'} is intact; fix this and rerun the same command to resume",
        ) from e


def _save(cfg: Config, acc, raw_model, ema: EMA, opt, sched, step: int, nonfinite: int) -> None:
    if acc.is_main_process:
        save_checkpoint(
            Path(cfg.train.run_dir) / "checkpoints", step,
            model=raw_model.state_dict(), ema=ema.state_dict(),
            optimizer={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                       **({"scaler": acc.scaler.state_dict()} if acc.scaler is not None else {})},
            meta={"nonfinite_steps": nonfinite, "config": to_dict(cfg)}, keep=cfg.train.keep_checkpoints,
        )  # fmt: skip
    acc.wait_for_everyone()
