"""Every value and cross-field check that can be made before any work, raising `ConfigError` naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import TYPE_CHECKING, Any

from repa.errors import ReportedError
from repa.models import MODELS

if TYPE_CHECKING:
    from repa.config.schema import Config, OptimConfig


class ConfigError(ReportedError, ValueError):
    """A config value, preset file or override that cannot run; the message names the key or the file."""

    exit_code = 2


MAX_LR = 1.0  # AdamW moves every weight by about lr per step: above this no run can train
DDPM_STEPS = 1000  # DDPM sampling respaces the 1000 training steps (DiT models and transport.diffusion=ddpm)
FASHION_MNIST_SIZE = 28


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every value and cross-field check that can be made before any work. Raises ConfigError (a ValueError)
    naming the key."""
    _check_finite(cfg)
    _check_ranges(cfg)
    t, d, r = cfg.train, cfg.data, cfg.repa
    if t.global_batch_size % (world_size * t.grad_accum_steps):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"num_processes ({world_size}) x train.grad_accum_steps ({t.grad_accum_steps})"
        )
    if d.kind == "latents" and d.space != "latent":
        raise ConfigError("data.kind=latents holds VAE latents: set data.space=latent")
    if r.encoder_weights and len(r.encoder_weights) != len(r.encoders):
        raise ConfigError("repa.encoder_weights must give one path per entry of repa.encoders")
    if cfg.transport.diffusion == "ddpm" and cfg.transport.path != "linear":
        raise ConfigError("transport.path only applies to diffusion=flow")
    if not 0.0 <= cfg.sample.guidance_low <= cfg.sample.guidance_high <= 1.0:
        raise ConfigError("sample guidance interval must satisfy 0 <= guidance_low <= guidance_high <= 1")
    if cfg.model.align_depth is not None and cfg.model.depth is not None and cfg.model.align_depth > cfg.model.depth:
        raise ConfigError(f"model.align_depth={cfg.model.align_depth} exceeds model.depth={cfg.model.depth}")
    _check_optim(cfg.optim)
    _check_lr_schedule(cfg)
    _check_trackers(cfg.train.trackers)
    if cfg.model.init_from is not None and not cfg.model.init_from.strip():
        raise ConfigError("model.init_from must name a checkpoint file or folder (or be null)")
    _check_model(cfg)
    _check_family(cfg)
    _check_end_to_end(cfg)
    _check_fsdp(cfg)
    _check_sample(cfg)


def _floats(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, float]]:
    """(dotted key, value) of every float in a config, tuple/list entries included."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{key}.")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, (list, tuple)):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def _check_finite(cfg: Config) -> None:
    """NaN/inf pass every `<` test and would surface mid-run (or never): no float of a config may be one."""
    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")


def _check_ranges(cfg: Config) -> None:
    """Numbers that would otherwise fail mid-run (a zero cadence divides by zero after the first step)."""
    t, o, d, m = cfg.train, cfg.optim, cfg.data, cfg.model
    positive = {"train.global_batch_size": t.global_batch_size, "train.grad_accum_steps": t.grad_accum_steps,
                "train.log_every": t.log_every, "train.sample_every": t.sample_every,
                "train.checkpoint_every": t.checkpoint_every, "data.resolution": d.resolution,
                "repa.encoder_resolution": cfg.repa.encoder_resolution, "sample.num_steps": cfg.sample.num_steps,
                "sample.num_images": cfg.sample.num_images, "train.num_threads": t.num_threads,
                "data.num_train": d.num_train, "model.hidden_size": m.hidden_size, "model.depth": m.depth,
                "model.num_heads": m.num_heads, "model.projector_dim": m.projector_dim,
                "repa.encoder_layer": cfg.repa.encoder_layer}  # fmt: skip
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    r = cfg.repa
    non_negative = {"train.max_steps": t.max_steps, "repa.align_coeff": r.align_coeff,
                    "train.keep_checkpoints": t.keep_checkpoints, "train.max_nonfinite_steps": t.max_nonfinite_steps,
                    "optim.lr": o.lr, "optim.warmup_steps": o.warmup_steps, "optim.grad_clip": o.grad_clip,
                    "optim.weight_decay": o.weight_decay, "data.num_workers": d.num_workers,
                    "repa.attention_coeff": r.attention_coeff, "repa.class_token_coeff": r.class_token_coeff,
                    "repa.self_align_coeff": r.self_align_coeff, "train.vae_lr": t.vae_lr,
                    "train.vae_align_coeff": t.vae_align_coeff, "train.vae_recon_coeff": t.vae_recon_coeff,
                    "train.vae_kl_coeff": t.vae_kl_coeff, "train.vae_perceptual_coeff": t.vae_perceptual_coeff}  # fmt: skip
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, seed in (("train.seed", t.seed), ("sample.seed", cfg.sample.seed)):
        if not 0 <= seed < 2**63:
            raise ConfigError(f"{key} must be in [0, 2**63), got {seed}")
    if not 0.0 <= o.ema_decay <= 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1], got {o.ema_decay}")
    if not 0.0 <= m.class_dropout_prob < 1.0:
        raise ConfigError(f"model.class_dropout_prob must be in [0, 1), got {m.class_dropout_prob}")
    if m.mlp_ratio is not None and not m.mlp_ratio > 0:
        raise ConfigError(f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    if t.compile_memory_budget is not None and not 0.0 < t.compile_memory_budget <= 1.0:
        raise ConfigError(f"train.compile_memory_budget must be in (0, 1], got {t.compile_memory_budget}")
    if not t.run_dir.strip():
        raise ConfigError("train.run_dir must name a folder")
    if d.root is not None and not d.root.strip():
        raise ConfigError("data.root must name a folder (or be null)")
    if d.space == "latent" and not d.vae.strip():
        raise ConfigError("data.vae must name the VAE that decodes the latents (data.space=latent)")
    if any(not name.strip() for name in cfg.repa.encoders):
        raise ConfigError(f"repa.encoders holds an empty name: {cfg.repa.encoders}")


def _check_optim(o: OptimConfig) -> None:
    """AdamW settings certain to fail (NaN on the first update, divergence) or meaningless."""
    if o.lr > MAX_LR:
        raise ConfigError(f"optim.lr={o.lr} is far too large for AdamW (each step moves every weight by about lr): "
                          f"use a value <= {MAX_LR}, e.g. 1e-4")  # fmt: skip
    for i, beta in enumerate(o.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optim.betas[{i}] must be in [0, 1), got {beta}")
    if not o.eps > 0:
        raise ConfigError(f"optim.eps must be > 0 (AdamW divides by sqrt(v) + eps: a weight whose gradient is 0 "
                          f"would get 0/0 = NaN), got {o.eps}")  # fmt: skip
    if o.lr * o.weight_decay > 1.0:
        raise ConfigError(f"optim.lr x optim.weight_decay = {o.lr * o.weight_decay:g} must be <= 1 (AdamW multiplies "
                          "every weight by 1 - lr x weight_decay each step)")  # fmt: skip


LR_SCHEDULES = ("constant", "cosine", "linear")  # repa.training.schedule
TRACKERS = ("tensorboard", "wandb")  # Accelerate's trackers repa offers (repa.training.tracking)


def _check_lr_schedule(cfg: Config) -> None:
    """The lr schedule: a known kind; a final lr in [0, lr] for the decays, none for constant; room for the decay."""
    o, steps = cfg.optim, cfg.train.max_steps
    if o.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"optim.lr_schedule={o.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if o.final_lr < 0:
        raise ConfigError(f"optim.final_lr must be >= 0, got {o.final_lr}")
    if o.lr_schedule == "constant":
        if o.final_lr != 0:
            raise ConfigError(f"optim.final_lr={o.final_lr} applies only to optim.lr_schedule=cosine or linear "
                              "(the lr is constant after the warm-up)")  # fmt: skip
        return
    if o.final_lr > o.lr:
        raise ConfigError(f"optim.final_lr={o.final_lr} must be <= optim.lr={o.lr}: optim.lr_schedule="
                          f"{o.lr_schedule} decays from optim.lr to optim.final_lr (a rise is optim.warmup_steps' "
                          "job)")  # fmt: skip
    if 0 < steps <= o.warmup_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} leaves no step for the {o.lr_schedule} decay, which "
                          f"ends at train.max_steps={steps}: use fewer warm-up steps or optim.lr_schedule="
                          "constant")  # fmt: skip


def _check_trackers(trackers: list[str]) -> None:
    """Known tracker names, each once (whether its package is installed is checked when training starts)."""
    for name in trackers:
        if name not in TRACKERS:
            close = difflib.get_close_matches(str(name), TRACKERS, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"valid: {', '.join(TRACKERS)}"
            raise ConfigError(f"train.trackers: {name!r} is not a tracker ({hint}); [] logs to metrics.jsonl only")
    if len(set(trackers)) != len(trackers):
        raise ConfigError(f"train.trackers lists a tracker twice: {trackers}")


def _check_model(cfg: Config) -> None:
    """The model name and the depth the projectors read, with the registry's values where the config has none."""
    m = cfg.model
    if m.name not in MODELS:
        close = difflib.get_close_matches(m.name, list(MODELS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(MODELS)}"
        raise ConfigError(f"model.name={m.name!r} is not a registered model ({hint})")
    reg = MODELS[m.name]
    depth = m.depth if m.depth is not None else reg["depth"]
    align = m.align_depth if m.align_depth is not None else reg["align_depth"]
    if (m.align_depth is not None or cfg.repa.enabled) and not 1 <= align <= depth:
        src = "" if m.depth is not None else f" (the depth of {m.name}; set model.depth to change it)"
        what = "model.align_depth" if m.align_depth is not None else f"{m.name}'s default align_depth"
        raise ConfigError(f"{what}={align} must be in [1, {depth}]{src}")
    hidden = m.hidden_size if m.hidden_size is not None else reg["hidden_size"]
    heads = m.num_heads if m.num_heads is not None else reg["num_heads"]
    if hidden % heads:
        raise ConfigError(f"model hidden_size={hidden} is not divisible by num_heads={heads}")
    if hidden % 4:
        raise ConfigError(f"model hidden_size={hidden} must be divisible by 4 (the 2-D sin-cos position embedding)")
    patch, d = reg["patch_size"], cfg.data
    size = {"fashion-mnist": FASHION_MNIST_SIZE, "folder": d.resolution}.get(d.kind)  # latents: the manifest's
    size = None if d.space == "latent" else size  # REPA-E's images are encoded: the VAE sets the latent size
    if size is not None and size % patch:
        what = "Fashion-MNIST's 28 px" if d.kind == "fashion-mnist" else f"data.resolution={d.resolution}"
        raise ConfigError(f"{what} is not divisible by the patch size {patch} of model.name={m.name}")


def _check_family(cfg: Config) -> None:
    """The REPA family's options (docs/family.md): blocks inside the model, settings that need an encoder."""
    m, r = cfg.model, cfg.repa
    depth = m.depth if m.depth is not None else MODELS[m.name]["depth"]
    if m.projector_kernel < 1 or m.projector_kernel % 2 == 0:
        raise ConfigError(f"model.projector_kernel must be odd and >= 1 (a centred window), got {m.projector_kernel}")
    if r.schedule != "constant":
        stop, start = r.schedule_stop, r.schedule_start
        if stop is None or stop < 0 or (r.schedule != "stop" and not 0 <= start < stop):
            raise ConfigError(f"repa.schedule={r.schedule} needs repa.schedule_stop >= 0"
                              + ("" if r.schedule == "stop" else " > repa.schedule_start >= 0"))  # fmt: skip
    if (r.attention_align or r.class_token) and not r.enabled:
        what = "attention_align" if r.attention_align else "class_token"
        raise ConfigError(f"repa.{what}=true needs a target encoder (repa.encoders and repa.align_coeff > 0)")
    if r.attention_align and r.cache_targets:  # REG's global token is cached beside the patch tokens; maps are not
        raise ConfigError("repa.attention_align=true runs the encoder every step (its attention maps are not in the "
                          "target cache): set repa.cache_targets=false")  # fmt: skip
    if r.attention_align:
        bad = [p for p in r.attention_pairs if len(p) != 2 or not 1 <= p[0] <= depth or p[1] < 1]
        if bad or not r.attention_pairs:
            raise ConfigError(f"repa.attention_pairs {bad or r.attention_pairs}: each is [model block in 1..{depth}, "
                              "encoder layer >= 1]")  # fmt: skip
    if r.self_align:
        blocks = r.self_align_blocks
        if len(blocks) != 2 or not all(1 <= b <= depth for b in blocks):
            raise ConfigError(f"repa.self_align_blocks={blocks}: two blocks (student, teacher) in 1..{depth}")
        if not 0.0 <= r.self_align_gap <= 1.0:
            raise ConfigError(f"repa.self_align_gap must be in [0, 1], got {r.self_align_gap}")


def _check_end_to_end(cfg: Config) -> None:
    """REPA-E (`train.end_to_end`): images encoded every step by a trainable VAE, tuned through the alignment loss."""
    t, d = cfg.train, cfg.data
    if t.vae_lr > MAX_LR:
        raise ConfigError(f"train.vae_lr={t.vae_lr} is far too large for AdamW: use a value <= {MAX_LR}, e.g. 1e-4")
    if not 0.0 < t.latent_bn_momentum <= 1.0:
        raise ConfigError(f"train.latent_bn_momentum must be in (0, 1], got {t.latent_bn_momentum}")
    if not t.end_to_end:
        return
    if d.space != "latent":
        raise ConfigError("train.end_to_end=true (REPA-E) trains the VAE that makes the latents: set data.space=latent "
                          "(a pixel-space run has no VAE)")  # fmt: skip
    if not cfg.repa.enabled:
        raise ConfigError("train.end_to_end=true (REPA-E) tunes the VAE through the alignment loss: it needs a target "
                          "encoder (repa.encoders and repa.align_coeff > 0)")  # fmt: skip
    if t.mixed_precision == "fp16":
        raise ConfigError("train.end_to_end=true does not support fp16 loss scaling: use bf16 (or no)")


def _check_fsdp(cfg: Config) -> None:
    """`train.fsdp`: what the sharded loop does not support is refused before any work."""
    t = cfg.train
    if not t.fsdp:
        return
    if t.mixed_precision == "fp16":
        raise ConfigError("train.fsdp=true does not support fp16 loss scaling: use bf16 (or no)")
    if t.end_to_end:
        raise ConfigError("train.fsdp=true with train.end_to_end=true (REPA-E) is not supported: use DDP (the "
                          "default of a multi-process launch)")  # fmt: skip


def _check_sample(cfg: Config) -> None:
    """Sampling settings that would only fail at the first sample grid, or be silently ignored."""
    s = cfg.sample
    if s.cfg_scale < 1.0:
        raise ConfigError(f"sample.cfg_scale must be >= 1 (1 = no guidance; the samplers guide only above 1), "
                          f"got {s.cfg_scale}")  # fmt: skip
    if s.cfg_scale > 1.0 and cfg.model.class_dropout_prob == 0:
        raise ConfigError(f"sample.cfg_scale={s.cfg_scale} needs the unconditional (null) class that "
                          "model.class_dropout_prob > 0 trains: set one, or sample.cfg_scale=1")  # fmt: skip
    why = _ddpm_reason(cfg)
    if why is not None and s.num_steps > DDPM_STEPS:
        raise ConfigError(f"sample.num_steps={s.num_steps}: {why} samples with DDPM, which respaces its "
                          f"{DDPM_STEPS} steps: use at most {DDPM_STEPS}")  # fmt: skip
    check_sampler(cfg)


def _ddpm_reason(cfg: Config) -> str | None:
    """The setting that makes the config's model sample with DDPM (`transport.diffusion=ddpm` or a learned-Sigma
    `model.name`); None for a flow model."""
    if cfg.transport.diffusion == "ddpm":
        return "transport.diffusion=ddpm"
    return f"model.name={cfg.model.name}" if MODELS.get(cfg.model.name, {}).get("learn_sigma", False) else None


DDPM_SAMPLERS = ("ode", "sde", "ddim")  # DDPM models: ancestral sampling for ode/sde (as before), or DDIM
FLOW_SAMPLERS = ("ode", "sde", "dopri5")


def check_sampler(cfg: Config, ddpm: bool | None = None) -> None:
    """The sampler settings against the kind of model: `ddim` samples DDPM models only, `dopri5` flow models only;
    tolerances > 0, `ddim_eta` in [0, 1]. Also called by `repa.generate.generate` (overrides set after load).

    Args:
        cfg: the run's config.
        ddpm: whether the model samples with DDPM (a learned-Sigma model or transport.diffusion=ddpm); None = from
            the config (`transport.diffusion` and the registry entry of `model.name`).
    """
    s = cfg.sample
    why = _ddpm_reason(cfg)
    if ddpm is None:
        ddpm = why is not None
    for key, value in (("sample.atol", s.atol), ("sample.rtol", s.rtol)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key} must be a finite number > 0 (a dopri5 tolerance), got {value}")
    if not (math.isfinite(s.ddim_eta) and 0.0 <= s.ddim_eta <= 1.0):
        raise ConfigError(f"sample.ddim_eta must be in [0, 1] (0 = deterministic DDIM), got {s.ddim_eta}")
    if ddpm and s.sampler not in DDPM_SAMPLERS:
        why = why or f"model.name={cfg.model.name}"
        raise ConfigError(f"sample.sampler={s.sampler} integrates a flow model's velocity, but {why} is a DDPM "
                          "(eps-prediction) model: use sample.sampler=ddim (DDIM) or sde (ancestral)")  # fmt: skip
    if not ddpm and s.sampler not in FLOW_SAMPLERS:
        raise ConfigError(f"sample.sampler={s.sampler} samples DDPM models, but model.name={cfg.model.name} with "
                          f"transport.diffusion={cfg.transport.diffusion} is a flow (velocity) model: use "
                          "sample.sampler=ode, sde or dopri5")  # fmt: skip
