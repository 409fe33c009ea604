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

from repa import distributed
from repa.checkpoint import (
    check_writable,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_training_checkpoint,
    save_training_checkpoint,
)
from repa.config import Config, dump_config, to_dict, validate
from repa.fileio import write_error_reason
from repa.hardware import precision_line
from repa.losses import RepaLoss
from repa.training import setup
from repa.training.batches import GlobalOrder, MicroBatchPlan, step_draws
from repa.training.data import TrainingData, load_train_images
from repa.training.ema import EMA
from repa.training.end_to_end import EndToEnd
from repa.training.finetune import initialise_from, resolve_init_from
from repa.training.guard import NonFiniteError, UpdateGuard
from repa.training.resume import CHANGES_LOG, apply_optim_config, check_model_fits, plan_resume, write_changes_log
from repa.training.rundir import RunDirLock, describe_holder, trim_metrics
from repa.training.schedule import lr_lambda
from repa.training.tracking import Trackers, check_installed, tracker_dir


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricWindow:
    """Sums of the logged terms over the steps since the last log line; skipped (non-finite) steps add zeros and
    are left out of the mean. Checkpoints carry the sums, so a window that spans a resume logs what an uninterrupted
    run logs, for any log and checkpoint intervals."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.good, self.start = 0, 0, time.perf_counter()  # steps: timed in this process (images/s)

    def add(self, terms: dict[str, torch.Tensor], finite: bool) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach() if finite else torch.zeros_like(v))
        self.steps += 1
        self.good += int(finite)

    def means(self) -> dict[str, float]:
        """Per-term means over the finite steps, averaged over processes."""
        return {k: float(distributed.all_reduce_mean(v)) / max(1, self.good) for k, v in self.sums.items()}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def state_dict(self) -> dict[str, Any]:
        """The sums (averaged over processes: every rank resumes with them) and the finite-step count; JSON floats
        hold float32 values exactly. A collective: call it on every process."""
        return {"sums": {k: float(distributed.all_reduce_mean(v)) for k, v in self.sums.items()}, "good": self.good}

    def load_state_dict(self, state: dict[str, Any] | None, device: torch.device) -> None:
        state = state or {}
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in state.get("sums", {}).items()}
        self.good = int(state.get("good", 0))


def train(cfg: Config, *, allow_config_change: bool = False) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data` with (or without) REPA; resume from `cfg.train.run_dir` if it holds a
    checkpoint.

    Args:
        cfg: the run's config.
        allow_config_change: resume even when the config changes the model or the training maths (each change is
            recorded in `config_changes.jsonl` and the checkpoints); harmless changes (max_steps, cadences, threads)
            always pass. The model's shape can never change.

    Returns:
        a summary dict (run_dir, step, last logged metrics).

    Raises:
        RunLockedError: another live process trains in the run directory.
        ConfigChangeError: the resume changes the model or the maths without `allow_config_change`.
        NonFiniteError: more than `train.max_nonfinite_steps` steps were skipped (NaN/inf loss, gradient or update).
    """
    tc = cfg.train
    run_dir = Path(tc.run_dir)
    check_installed(tc.trackers)  # Accelerate would silently drop a tracker whose package is missing
    acc = distributed.make_accelerator(tc.mixed_precision, trackers=tc.trackers, project_dir=tracker_dir(run_dir))
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    if acc.distributed_type.name == "FSDP":  # Accelerate's plugin would wrap the model behind the loop's back
        raise ValueError("an Accelerate FSDP config launches this run: use a plain multi-GPU config (or torchrun) and "
                         "set train.fsdp=true, the loop's own FSDP (docs/scaling.md)")  # fmt: skip
    validate(cfg, world_size=world)
    if tc.mixed_precision == "fp16" and device.type == "cpu":  # Accelerate would silently run fp32, no loss scaling
        raise ValueError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 (or no)")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.allow_tf32
        torch.backends.cudnn.allow_tf32 = tc.allow_tf32
    if acc.is_main_process:
        check_writable(run_dir)  # a read-only or full disk fails here, before any work
    # one training process per run directory: a second one is refused here, a killed holder's lock is taken over
    with (
        RunDirLock(run_dir) if acc.is_main_process else contextlib.nullcontext() as lock,
        contextlib.ExitStack() as on_exit,
    ):
        if lock is not None and lock.took_over:
            distributed.print0(
                f"[repa] taking over {lock.path} from {describe_holder(lock.took_over)}: no longer running"
            )
        if acc.is_main_process:
            (run_dir / "samples").mkdir(exist_ok=True)
        acc.wait_for_everyone()
        resume = plan_resume(cfg, run_dir, allow_config_change)  # config changes are judged before any work
        init_from = resolve_init_from(cfg) if resume.path is None else None  # a missing file: before any work
        if resume.path is not None and cfg.model.init_from is not None:
            distributed.print0(f"[repa] model.init_from not read: the run resumes from its checkpoint (step "
                               f"{resume.step}), whose weights win")  # fmt: skip

        # ---- data, encoders, targets, model, loss
        data = load_train_images(cfg)
        e2e = EndToEnd(cfg, device) if tc.end_to_end else None  # REPA-E: the VAE trains with the model
        if e2e is not None:
            data = e2e.wrap(data)  # the images, encoded every step by the trainable VAE
        targets = setup.plan_targets(cfg, data, device)
        torch.manual_seed(tc.seed)  # the initial weights are a function of the seed (identical on every rank)
        # checks align depth / token grids before any target is computed
        model = setup.build_model(cfg, data, targets.specs).to(device)
        check_model_fits(model, resume)  # a resume with another model shape: one line, before the targets are computed
        if init_from is not None:  # fine-tuning: the backbone from public weights (a fresh start only)
            initialise_from(cfg, model, init_from, run_dir)
        if targets.cache:
            setup.prepare_targets(cfg, data, targets.encoders)  # fills data.targets (computed once, cached on disk)
        loss_fn = setup.build_loss(cfg)
        ema = EMA(model, cfg.optim.ema_decay, warmup=cfg.optim.ema_warmup)
        if tc.fsdp:  # before the optimizer: sharding replaces the parameters by DTensors
            if distributed.ensure_process_group():
                on_exit.callback(torch.distributed.destroy_process_group)
            model = setup.shard_model(cfg, model)
            ema.shard(lambda m: setup.shard_model(cfg, m))
        # fused AdamW (one kernel over all tensors) where torch has it: on the 2-core CPU, SiT-B/2's update takes
        # 0.06 s fused vs 0.16 s per-parameter and 0.31 s foreach (`python -m benchmarks.micro`); same algorithm
        fused = device.type in ("cpu", "cuda")
        opt = torch.optim.AdamW(
            model.parameters() if e2e is None else e2e.param_groups(model), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay, fused=fused, foreach=None if fused else True,
        )  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))  # optim.lr_schedule after the warm-up

        # ---- resume: rerunning the same command continues from the newest complete checkpoint
        start_step, nonfinite, overflow, window = resume.step, 0, 0, MetricWindow()
        if resume.path is not None:
            ckpt_path, ckpt = load_latest_checkpoint(run_dir / "checkpoints")  # refuses NaN/inf weights
            if tc.fsdp:  # the files hold full tensors: each rank keeps its shards
                ckpt = setup.shard_checkpoint(ckpt, model, ema, opt)
            state = restore_training_checkpoint(ckpt, model=model, ema=ema, optimizer=opt, scheduler=sched,
                                                scaler=acc.scaler, vae=e2e and e2e.tuned)  # fmt: skip
            del ckpt  # the tensors live in the model, EMA and optimizer now
            apply_optim_config(opt, sched, cfg)  # the restored param groups hold the checkpoint's lr, eps, ...
            nonfinite, overflow = int(state.get("nonfinite_steps", 0)), int(state.get("fp16_overflow_steps", 0))
            window.load_state_dict(state.get("metric_window"), device)  # the log window spanning the resume
            if nonfinite > tc.max_nonfinite_steps:  # the run stopped on NaN/inf; a rerun gets a fresh allowance
                distributed.print0(
                    f"[repa] the previous run stopped after {nonfinite} non-finite steps; counting again from 0"
                )
                nonfinite = 0
            distributed.print0(f"[repa] resuming from {ckpt_path} (step {start_step})")
            if acc.is_main_process:  # a run killed between renaming its last checkpoint into place and pruning
                prune_checkpoints(run_dir / "checkpoints", tc.keep_checkpoints)  # may have nothing left to save
            if resume.changes:
                distributed.print0(f"[repa] config changed since {ckpt_path.name}: {'; '.join(map(str, resume.changes))} "
                                   f"(recorded in {run_dir / CHANGES_LOG})")  # fmt: skip
        if acc.is_main_process:
            dump_config(cfg, run_dir / "config.yaml")
            write_changes_log(run_dir, resume.history)
            trim_metrics(run_dir / "metrics.jsonl", start_step)  # replayed steps are logged again; drop torn lines
        trackers = Trackers(acc, cfg, run_dir, start_step)  # train.trackers (none: metrics.jsonl alone)
        on_exit.callback(trackers.close)

        if not tc.fsdp:  # DDP over several processes (FSDP shards on its own, above)
            model, opt = acc.prepare(model, opt)
        raw_model = acc.unwrap_model(model)
        guard = UpdateGuard(opt, [p for group in opt.param_groups for p in group["params"]], acc.scaler)
        if tc.compile:
            model = setup.compile_model(model, tc.compile_memory_budget)

        local_batch = tc.global_batch_size // (world * tc.grad_accum_steps)
        plan = MicroBatchPlan(local_batch, world, rank, tc.grad_accum_steps)
        order = GlobalOrder(data.num_items, tc.seed, cfg.data.hflip)
        if acc.is_main_process and start_step == 0:
            n_params = sum(p.numel() for p in raw_model.parameters())
            distributed.print0(f"[repa] {cfg.model.name}: {n_params / 1e6:.2f}M parameters, {data.num_items} training items, "
                     f"global batch {tc.global_batch_size} on {world} process(es), REPA {'on' if cfg.repa.enabled else 'off'}")  # fmt: skip
        distributed.print0(f"[repa] {precision_line(tc.mixed_precision, acc.device.type)}")

        def save(step: int) -> None:
            meta = {"nonfinite_steps": nonfinite, "fp16_overflow_steps": overflow, "config": to_dict(cfg),
                    "config_changes": resume.history, "metric_window": window.state_dict()}  # fmt: skip
            _save(cfg, acc, raw_model, ema, opt, sched, step, meta, e2e)

        metrics_file = run_dir / "metrics.jsonl"
        bar = tqdm(total=tc.max_steps, initial=start_step, disable=not (tc.progress and acc.is_main_process),
                   desc="train", dynamic_ncols=True)  # fmt: skip
        last = {}
        model.train()
        for step in range(start_step, tc.max_steps):
            terms, grad_norm = _train_step(cfg, model=model, loss_fn=loss_fn, acc=acc, data=data, order=order,
                                           plan=plan, step=step, online_encoders=targets.online, teacher=ema.model,
                                           draw_args=setup.family_draws(cfg, targets), e2e=e2e)  # fmt: skip
            loss_finite = all(bool(torch.isfinite(v)) for v in terms.values())
            grads_finite = loss_finite and bool(torch.isfinite(grad_norm))
            # a finite gradient can still give a NaN/inf update (optim.eps=0, an overflowing lr): undone if so
            updated = grads_finite and guard.step(float(grad_norm))
            if e2e is not None and not updated:
                e2e.undo()  # the latent BatchNorm's statistics of a skipped step go back with the weights
            if updated:
                sched.step()
                ema.update(raw_model, step)
            elif not grads_finite and loss_finite and acc.scaler is not None:
                opt.step()  # the GradScaler skips this overflowed update and lowers its scale
                overflow += 1
            else:
                nonfinite += 1
                what = "the update made weights NaN/inf (undone)" if grads_finite else "non-finite loss or gradient"
                distributed.print0(f"[repa] step {step}: {what}, update skipped ({nonfinite} so far)")
            opt.zero_grad(set_to_none=True)
            window.add({**terms, "grad_norm": grad_norm}, updated)
            done = step + 1
            bar.update(1)

            if done % tc.log_every == 0 or done == tc.max_steps:
                record = {"step": done, **window.means()}
                record.update(lr=sched.get_last_lr()[0], images_per_s=window.steps * tc.global_batch_size / window.elapsed(),
                              peak_memory_gb=_peak_memory_gb(device), nonfinite_steps=nonfinite,
                              fp16_overflow_steps=overflow)  # fmt: skip
                if acc.is_main_process:
                    with (
                        _reported_write(metrics_file, "the metrics log", run_dir),
                        open(metrics_file, "a", encoding="utf-8") as f,
                    ):
                        f.write(json.dumps(record) + "\n")
                    trackers.log(record, done)
                    bar.set_postfix({k: f"{record[k]:.4f}" for k in ("denoise", "align") if k in record})
                last, window = record, MetricWindow()
            if nonfinite > tc.max_nonfinite_steps:
                save(done)
                raise NonFiniteError(
                    f"{nonfinite} steps had non-finite loss, gradients or updates (train.max_nonfinite_steps="
                    f"{tc.max_nonfinite_steps}); stopped at step {done} with a checkpoint (finite weights) in "
                    f"{run_dir / 'checkpoints'}. Lower optim.lr, check optim.eps, use bf16 instead of fp16, or check "
                    "the data."
                )
            if done % tc.sample_every == 0 or done == tc.max_steps:
                grid = run_dir / "samples" / f"step_{done:08d}.png"
                # FSDP: the sharded EMA model samples on every rank (each forward gathers); rank 0 writes
                if tc.fsdp or acc.is_main_process:
                    with _reported_write(grid, "the sample grid", run_dir):
                        setup.sample_grid(cfg, ema.model, data, grid if acc.is_main_process else None,
                                          e2e and e2e.tuned.decode_to_uint8)  # fmt: skip
                if acc.is_main_process:
                    trackers.log_grid(grid, done)
                acc.wait_for_everyone()
            if done % tc.checkpoint_every == 0 or done == tc.max_steps:
                save(done)
        bar.close()
        trackers.end()
        acc.wait_for_everyone()
    return {"run_dir": str(run_dir), "step": max(start_step, tc.max_steps), "metrics": last}


def _train_step(
    cfg: Config,
    *,
    model: torch.nn.Module,
    loss_fn: RepaLoss,
    acc: Any,
    data: TrainingData,
    order: GlobalOrder,
    plan: MicroBatchPlan,
    step: int,
    online_encoders: list[torch.nn.Module],
    teacher: torch.nn.Module,
    draw_args: dict[str, Any],
    e2e: EndToEnd | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward/backward over the micro-batches of one optimizer step; returns (mean loss terms, grad norm).
    `teacher` (the EMA model) and `draw_args` serve the REPA family's options (`setup.family_step`); `e2e` REPA-E's
    VAE pass (`EndToEnd.vae_pass`: it makes x and backpropagates into the VAE; the model pass sees x detached)."""
    tc = cfg.train
    totals: dict[str, torch.Tensor] = {}
    if e2e is not None:
        e2e.snapshot()
    for micro in range(tc.grad_accum_steps):
        idx, flips = order.take(plan.position(step, micro), plan.global_micro)
        posterior = data.needs_posterior  # latents are a fresh VAE posterior sample each step
        draws = step_draws(tc.seed, step, micro, plan.global_micro, data.sample_shape, cfg.model.class_dropout_prob,
                           posterior=posterior, **draw_args)  # fmt: skip
        sl = plan.local_slice()
        batch = data.batch(idx[sl], flips[sl], acc.device, eps=draws["eps"][sl] if posterior else None)
        online, extra = setup.family_step(cfg, step, draws, sl, batch.get("images"), online_encoders, teacher,
                                          acc.device, acc.autocast)  # fmt: skip
        targets = online if online is not None else batch.get("targets")
        vae_terms: dict[str, torch.Tensor] = {}
        if e2e is not None:
            batch["x"], vae_terms = e2e.vae_pass(  # the bare module: this backward reaches the VAE only, outside DDP
                acc.unwrap_model(model), loss_fn, batch, targets, setup.loss_time(cfg, draws["u"][sl].to(acc.device)),
                draws["noise"][sl].to(acc.device), draws["eps"][sl], extra, autocast=acc.autocast,
                backward=lambda loss: acc.backward(loss / tc.grad_accum_steps, inputs=e2e.params),
            )  # fmt: skip
        sync = micro == tc.grad_accum_steps - 1
        if tc.fsdp:  # accumulate unreduced gradients until the last micro-batch
            model.set_requires_gradient_sync(sync)
        with acc.no_sync(model) if not sync and acc.num_processes > 1 and not tc.fsdp else contextlib.nullcontext():
            with acc.autocast():
                terms = loss_fn(
                    model, batch["x"], batch["y"], targets if cfg.repa.enabled else None,
                    t=setup.loss_time(cfg, draws["u"][sl].to(acc.device)), noise=draws["noise"][sl].to(acc.device),
                    model_kwargs={"force_drop_ids": draws["drop"][sl].to(acc.device).long()}, **extra,
                )  # fmt: skip
            if "align_weight" in extra:  # the schedule's multiplier of lambda, logged with the terms
                terms["align_weight"] = torch.tensor(float(extra["align_weight"]), device=acc.device)
            acc.backward(terms["total"] / tc.grad_accum_steps)
        terms.update(vae_terms)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + v.detach().float() / tc.grad_accum_steps
    if tc.fsdp:
        grad_norm = distributed.grad_norm(list(model.parameters()), cfg.optim.grad_clip)
    elif cfg.optim.grad_clip > 0:
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None])
        )
    if e2e is not None:  # the VAE's gradient is clipped on its own (REPA-E)
        totals["vae_grad_norm"] = e2e.grad_norm(cfg.optim.grad_clip)
    return totals, torch.as_tensor(grad_norm, dtype=torch.float32).detach()


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


def _save(cfg: Config, acc: Any, raw_model: torch.nn.Module, ema: Any, opt: Any, sched: Any, step: int,
          meta: dict[str, Any], e2e: EndToEnd | None = None) -> None:  # fmt: skip
    if cfg.train.fsdp:  # every rank takes part in gathering the shards; rank 0 writes the same files as DDP
        raw_model, ema, opt = (
            distributed.Frozen(distributed.gather_full(x.state_dict(), keep=acc.is_main_process))
            for x in (raw_model, ema, opt)
        )
    if acc.is_main_process:
        save_training_checkpoint(Path(cfg.train.run_dir) / "checkpoints", step, model=raw_model, ema=ema, optimizer=opt,
                                 scheduler=sched, scaler=acc.scaler, keep=cfg.train.keep_checkpoints, meta=meta,
                                 vae=e2e and e2e.tuned)  # fmt: skip
    acc.wait_for_everyone()
