"""Builders that turn a Config into the run's pieces: the target plan (encoders, cached or stored targets), the
model, the loss and its time draw, compilation, and the periodic sample grid."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
from torch import nn

from repa import distributed
from repa.assets import cache_dir
from repa.config import Config
from repa.data.features import TargetCache, build_target_cache
from repa.encoders import load_encoder
from repa.generate import decoder_for, generate, grid_labels, save_grid
from repa.losses import RepaLoss, align_weight
from repa.models import MODELS
from repa.models import build_model as build_backbone
from repa.training.data import InMemoryImages, TargetSpec, TrainingData
from repa.training.ema import EMA
from repa.transport import time_from_uniform


@dataclass
class TargetPlan:
    """Where the alignment targets of a run come from.

    Attributes:
        encoders: the loaded frozen encoders (none when the data stores the targets, or for vanilla training).
        specs: (name, embed_dim, token_grid) per target: the projectors' output widths and the grids to check.
        cache: compute the encoders' targets once over the training set (`prepare_targets`) instead of every step.
    """

    encoders: list[nn.Module] = field(default_factory=list)
    specs: list[TargetSpec] = field(default_factory=list)
    cache: bool = False

    @property
    def online(self) -> list[nn.Module]:
        """The encoders to run every step."""
        return [] if self.cache else self.encoders


def plan_targets(cfg: Config, data: TrainingData, device: torch.device) -> TargetPlan:
    """Decide, before any model is built, which encoders run and whether their targets are cached or stored."""
    r = cfg.repa
    if not r.enabled:
        return TargetPlan()
    if data.stores_targets and r.cache_targets:  # latent shards: the targets were stored by `repa prepare`
        data.check_encoders(r.encoders, r.encoder_resolution, r.encoder_layer)
        if r.class_token:  # REG: the stored global token rides in front of encoder 0's targets (`family_step`)
            data.use_class_token()
        return TargetPlan(specs=data.target_specs)
    if not data.has_images:
        raise ValueError("repa.cache_targets=false on latent shards runs the encoders on the stored images: "
                         "prepare them with `repa prepare --images`")  # fmt: skip
    encoders = build_encoders(cfg, device)
    specs = [(e.name, e.embed_dim, tuple(e.token_grid)) for e in encoders]
    return TargetPlan(encoders, specs, cache=r.cache_targets and not data.stores_targets)


def build_encoders(cfg: Config, device: torch.device) -> list[nn.Module]:
    """The frozen target encoders named in `cfg.repa` (none for vanilla training)."""
    r = cfg.repa
    weights = r.encoder_weights or [None] * len(r.encoders)
    return [
        load_encoder(name, r.encoder_resolution, weights=w, layer=r.encoder_layer, device=str(device))
        for name, w in zip(r.encoders, weights)
    ]


def target_cache_path(cfg: Config, data: InMemoryImages, encoder: nn.Module) -> Path:
    r = cfg.repa
    layer = "final" if r.encoder_layer is None else f"l{r.encoder_layer}"
    flips = "flip" if cfg.data.hflip else "noflip"
    name = f"{data.fingerprint()}-{encoder.name.replace('/', '_')}-{r.encoder_resolution}-{layer}-{flips}.safetensors"
    return cache_dir() / "targets" / name


def prepare_targets(cfg: Config, data: InMemoryImages, encoders: list[nn.Module]) -> None:
    """Compute (once, cached across runs) each encoder's patch tokens for every training image, both flips.

    Rank 0 builds missing caches while the others wait; then every rank memory-maps them into `data.targets`
    (and, for REG, encoder 0's global tokens into `data.class_tokens`).
    """
    if not encoders:
        return
    flips = (False, True) if cfg.data.hflip else (False,)
    paths = [target_cache_path(cfg, data, enc) for enc in encoders]
    if distributed.is_main():
        for enc, path in zip(encoders, paths):
            if not path.exists():
                distributed.print0(f"[repa] computing {enc.name} targets for {data.num_items} images -> {path}")
            # an existing cache is reused only if its metadata (encoder, weights source, images) matches
            build_target_cache(enc, data.images, path, flips=flips, progress=cfg.train.progress,
                               global_token=cfg.repa.class_token and path == paths[0])  # fmt: skip
    distributed.barrier()
    caches = [TargetCache.load(p) for p in paths]
    data.targets = [c.tensor for c in caches]
    if cfg.repa.class_token:  # REG: the global token rides in front of encoder 0's targets (`family_step`)
        data.class_tokens = caches[0].global_tokens


def build_model(cfg: Config, data: TrainingData, targets: list[TargetSpec]) -> nn.Module:
    """The diffusion transformer sized for the data, with one projector per alignment target (`TargetPlan.specs`)."""
    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("hidden_size", "depth", "num_heads", "mlp_ratio", "align_depth")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    c, h, w = data.sample_shape
    if h != w:
        raise ValueError(f"training images must be square, got {h}x{w}")
    model = build_backbone(
        m.name,
        input_size=h,
        in_channels=c,
        num_classes=data.num_classes,
        class_dropout_prob=m.class_dropout_prob,
        encoder_dims=[dim for _, dim, _ in targets],
        projector_dim=m.projector_dim,
        qk_norm=m.qk_norm,
        **overrides,
        **family_model_kwargs(cfg, targets),
    )
    if m.grad_checkpointing and hasattr(model, "grad_checkpointing"):
        model.grad_checkpointing = True
    grid = h // model.patch_size
    for name, _, token_grid in targets:
        if token_grid != (grid, grid) and not cfg.repa.resample_tokens:
            raise ValueError(
                f"token-grid mismatch: {name} at {cfg.repa.encoder_resolution} px gives a {token_grid} grid "
                f"but the model has {grid}x{grid} patches; set repa.encoder_resolution so they match or "
                "repa.resample_tokens=true"
            )
    return model


def family_model_kwargs(cfg: Config, targets: list[TargetSpec]) -> dict[str, object]:
    """The model options of the REPA family that are on (none: the plain model, bit for bit)."""
    m, r = cfg.model, cfg.repa
    out: dict[str, object] = {}
    if m.projector != "mlp":
        out.update(projector=m.projector, projector_kernel=m.projector_kernel)
    if r.class_token and targets:
        out["class_token_dim"] = targets[0][1]  # REG: the first encoder's global token
    if r.self_align:
        out["self_align"] = True
    return out


def build_loss(cfg: Config) -> RepaLoss:
    """The REPA loss of the run (the denoising term alone for vanilla training), with the family's options."""
    tp, r = cfg.transport, cfg.repa
    return RepaLoss(path=tp.path, prediction=tp.prediction, time_sampling=tp.time_sampling,
                    align_coeff=r.align_coeff if r.enabled else 0.0, align_kind=r.align_kind,
                    resample=r.resample_tokens, diffusion=tp.diffusion,
                    spatial_norm_gamma=r.spatial_norm_gamma if r.spatial_norm else None,
                    attn_coeff=r.attention_coeff, attn_pairs=[tuple(p) for p in r.attention_pairs],
                    class_token_coeff=r.class_token_coeff, self_align_coeff=r.self_align_coeff,
                    self_align_blocks=tuple(r.self_align_blocks), self_align_gap=r.self_align_gap,
                    self_align_kind=r.self_align_kind,
                    learn_sigma=MODELS[cfg.model.name]["learn_sigma"])  # fmt: skip


def family_step(
    cfg: Config,
    step: int,
    draws: dict[str, torch.Tensor],
    rows: slice,
    images: torch.Tensor | None,
    online_encoders: list[nn.Module],
    teacher: nn.Module,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> tuple[list[torch.Tensor] | None, dict[str, object]]:
    """This step's online encoder targets (None: the batch's stored/cached ones) and the REPA family's extra loss
    arguments: HASTE's schedule weight (a function of the step only, so resume replays it), REG's global token and
    its noise, HASTE's encoder attention maps, SRA's EMA teacher and time-gap draws. Nothing when every option is
    off (the plain REPA call). Where the schedule's weight is 0 (HASTE after its stop) the online encoders do not
    run unless REG needs the global token or REPA-E's VAE its alignment term: the model's alignment terms are then
    not computed (`RepaLoss`)."""
    r = cfg.repa
    extra: dict[str, object] = {}
    if r.schedule != "constant":
        extra["align_weight"] = align_weight(step, r.schedule, stop_step=r.schedule_stop, start_step=r.schedule_start)
    targets = None
    # after a schedule's stop no target is needed, unless REG's global token or REPA-E's VAE alignment reads them
    idle = extra.get("align_weight") == 0.0 and not r.class_token and not cfg.train.end_to_end
    if idle and r.attention_align:
        extra["attn_targets"] = {}  # the term stays in the logs (as 0) without the encoder's maps
    if online_encoders and not idle:
        layers = sorted({enc_layer for _, enc_layer in r.attention_pairs}) if r.attention_align else []
        with torch.no_grad(), autocast():
            if r.class_token or r.attention_align:  # one forward: tokens, global token, attention maps of encoder 0
                first = online_encoders[0].encode(images, global_token=r.class_token, attention_layers=layers)
                targets = [first.tokens] + [enc(images) for enc in online_encoders[1:]]
                if r.class_token:
                    extra["class_tokens"] = first.global_token
                if r.attention_align:
                    extra["attn_targets"] = first.attentions
            else:
                targets = [enc(images) for enc in online_encoders]
    if r.class_token:
        extra["noise_cls"] = draws["noise_cls"][rows].to(device)
        if not online_encoders:  # cached or stored targets: encoder 0's global token is their first token
            extra["class_tokens_in_targets"] = True
    if r.self_align:
        extra.update(teacher=teacher, teacher_u=draws["teacher_u"][rows].to(device))
    return targets, extra


def family_draws(cfg: Config, targets: TargetPlan) -> dict[str, object]:
    """The extra per-step draws the family options need (`step_draws` keyword arguments; none when off)."""
    r = cfg.repa
    return {"teacher": r.self_align, "class_token_dim": targets.specs[0][1] if r.class_token and targets.specs else 0}


def loss_time(cfg: Config, u: torch.Tensor) -> torch.Tensor:
    """The loss's time from the step's pre-drawn uniform u: flow models draw t from `transport.time_sampling`;
    DDPM maps u in [0, 1) to timestep floor(u * T) inside the loss."""
    tp = cfg.transport
    return u if tp.diffusion == "ddpm" else time_from_uniform(u, tp.time_sampling, path=tp.path)


def compile_model(model: nn.Module, memory_budget: float | None = None) -> nn.Module:
    """`torch.compile(model)` with the compiled backward's activation memory budget (`train.compile_memory_budget`:
    below 1 the cheapest ops are recomputed instead of saved; None = the compiler's default, 1.0). The budget is a
    process-wide compiler setting, read when the first call compiles."""
    functorch_config.activation_memory_budget = 1.0 if memory_budget is None else memory_budget
    return torch.compile(model)


def shard_model(cfg: Config, model: nn.Module) -> nn.Module:
    """`train.fsdp`: FSDP2 over the process group, one all-gather unit per transformer block; the methods the loss,
    SRA's teacher and the samplers call besides `forward` gather the parameters too."""
    return distributed.shard_model(
        model, list(model.blocks), reshard_after_forward=cfg.train.fsdp_reshard_after_forward,
        forward_methods=("velocity", "velocity_joint", "forward_hidden"),
    )  # fmt: skip


def shard_checkpoint(ckpt: dict, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer) -> dict:
    """A loaded checkpoint (full tensors, the format every run writes) with the model, EMA and optimizer tensors
    sharded like the FSDP model's, ready for `restore_training_checkpoint`."""
    opt_state = ckpt["optimizer"]
    return {
        **ckpt,
        "model": distributed.shard_like(ckpt["model"], model.state_dict()),
        "ema": distributed.shard_like(ckpt["ema"], ema.state_dict()),
        "optimizer": {**opt_state, "optimizer": distributed.shard_optimizer_state(optimizer, opt_state["optimizer"])},
    }


def sample_grid(
    cfg: Config,
    model: nn.Module,
    data: TrainingData,
    path: Path | None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """A grid of `cfg.sample.num_images` EMA samples, one class per column (at most 10 columns), written to `path`
    (None: sampled, not written: the other ranks of an FSDP model); `decode` (x -> uint8) replaces the data's VAE
    (REPA-E: the VAE being trained, with its latent BatchNorm's running statistics)."""
    n = cfg.sample.num_images
    labels = grid_labels(n, data.num_classes)
    x = generate(model, cfg, labels, data.sample_shape, cfg.sample.seed)
    if path is None:
        return
    device = next(model.parameters()).device
    decode = decode or decoder_for(data.vae, device, data.latent_norm)
    save_grid(decode(x.to(device)).cpu(), path, nrow=min(data.num_classes, n, 10))
