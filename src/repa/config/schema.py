"""The run configuration's schema: one small typed dataclass per component, composed into `Config` (validated on
construction by `repa.config.validate`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from repa.config.validate import validate


@dataclass
class ModelConfig:
    """The diffusion transformer. `name` picks a registry entry; the other fields override it."""

    name: str = "SiT-XL/2"
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    align_depth: int | None = None  # 1-indexed block whose output feeds the projectors; None = registry default
    projector_dim: int = 2048
    qk_norm: bool = False
    class_dropout_prob: float = 0.1
    grad_checkpointing: bool = False
    projector: Literal["mlp", "conv"] = "mlp"  # iREPA: a convolution over the token grid instead of the MLP
    projector_kernel: int = 3  # conv projector kernel (iREPA's README: 3)
    # fine-tuning: the backbone's initial weights from an official REPA `last.pt`, a SiT/DiT checkpoint or a repa
    # run/checkpoint (`repa.loading.load_for_finetuning`; EMA weights where present); fresh starts only
    init_from: str | None = None


@dataclass
class DataConfig:
    """Training data. `fashion-mnist`: bundled 28x28 grayscale, pixel space; `folder`: ImageNet-layout images;
    `latents`: shards written by `repa prepare` (VAE posterior mean/std + encoder targets)."""

    kind: Literal["fashion-mnist", "folder", "latents"] = "latents"
    root: str | None = None
    resolution: int = 256  # image side; latents are resolution / 8
    num_train: int | None = None  # first-N class-balanced subset (None = all)
    hflip: bool = True
    space: Literal["pixel", "latent"] = "latent"
    vae: str = "stabilityai/sd-vae-ft-ema"
    num_workers: int = 0


@dataclass
class RepaConfig:
    """The alignment regulariser. No encoders or align_coeff == 0 gives vanilla training (no encoder is run)."""

    encoders: list[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    encoder_resolution: int = 224
    encoder_layer: int | None = None  # None = final layer (after the final norm)
    encoder_weights: list[str] = field(default_factory=list)  # local paths, one per encoder (optional)
    align_coeff: float = 0.5
    align_kind: Literal["cos", "ntxent"] = "cos"
    resample_tokens: bool = True  # resample encoder token grids to the model grid when they differ
    cache_targets: bool = True  # precompute encoder targets once instead of running the encoder every step
    # the REPA family (docs/family.md); every option off = plain REPA, bit for bit
    spatial_norm: bool = False  # iREPA: targets normalised over each image's token grid
    spatial_norm_gamma: float = 0.6  # iREPA: coefficient on the spatial mean (official LDM default)
    schedule: Literal["constant", "stop", "linear", "cosine"] = "constant"  # HASTE: lambda as a function of the step
    schedule_start: int = 0  # linear/cosine: full weight up to this step
    schedule_stop: int | None = None  # stop/linear/cosine: zero weight from this step (HASTE: 250000)
    attention_align: bool = False  # HASTE: align model attention maps with the encoder's
    attention_coeff: float = 0.5
    attention_pairs: list[list[int]] = field(default_factory=lambda: [[5, 9], [6, 10], [7, 11], [8, 12]])
    class_token: bool = False  # REG: the encoder's global token as one more noised input/output token
    class_token_coeff: float = 0.03
    self_align: bool = False  # SRA: an early block at t aligned to a later EMA block at a smaller t; no encoder
    self_align_coeff: float = 0.5
    self_align_blocks: list[int] = field(default_factory=lambda: [8, 20])  # (student, teacher), SiT-XL/2
    self_align_gap: float = 0.2  # largest time gap t_max
    self_align_kind: Literal["cos", "smooth_l1"] = "cos"

    @property
    def enabled(self) -> bool:
        """External-encoder alignment is on (SRA's self-alignment needs no encoder: `self_align`)."""
        return bool(self.encoders) and self.align_coeff > 0


@dataclass
class TransportConfig:
    """Interpolant / diffusion process (time convention lives in repa.transport)."""

    diffusion: Literal["flow", "ddpm"] = "flow"
    path: Literal["linear", "cosine"] = "linear"
    prediction: Literal["v"] = "v"
    time_sampling: Literal["uniform", "lognormal"] = "uniform"


@dataclass
class OptimConfig:
    """AdamW + EMA, the official recipe's defaults."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # after the warm-up (repa.training.schedule)
    final_lr: float = 0.0  # cosine/linear: the lr reached at train.max_steps
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay = min(ema_decay, (1 + step) / (10 + step)); useful for short runs


@dataclass
class SampleConfig:
    """Sampling for periodic grids and `repa sample`.

    `sampler`: flow models take `ode` (Euler/Heun, `heun`), `sde` (Euler-Maruyama) or `dopri5` (adaptive, needs the
    optional torchdiffeq; `atol`/`rtol` are its tolerances, SiT's defaults, and `num_steps` is unused); DDPM models
    (DiT, `transport.diffusion=ddpm`) sample ancestrally over `num_steps` respaced steps, or with DDIM (`ddim`,
    noise scale `ddim_eta`: 0 deterministic, 1 the ancestral posterior variance).
    """

    sampler: Literal["ode", "sde", "dopri5", "ddim"] = "sde"
    num_steps: int = 250
    heun: bool = False
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 0.7
    num_images: int = 64
    seed: int = 0
    atol: float = 1e-6  # dopri5 absolute tolerance (SiT's default)
    rtol: float = 1e-3  # dopri5 relative tolerance (SiT's default)
    ddim_eta: float = 0.0  # DDIM noise scale in [0, 1]


@dataclass
class TrainConfig:
    """The loop: batch, duration, precision, cadence of logs/samples/checkpoints."""

    run_dir: str = "runs/default"
    seed: int = 0
    global_batch_size: int = 256
    grad_accum_steps: int = 1
    max_steps: int = 400_000
    # auto: bf16 where it runs natively (a CUDA GPU with bf16, a CPU with AVX-512 BF16 / AMX / Arm BF16), else fp32
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    allow_tf32: bool = True
    compile: bool = False
    # with compile: the share of activations the backward may keep (torch._functorch activation_memory_budget);
    # below 1 the compiler recomputes the cheapest ops (pointwise first) instead of saving them: less memory, a
    # little more time (benchmarks/README.md). None = the compiler's default (1.0).
    compile_memory_budget: float | None = None
    log_every: int = 50
    sample_every: int = 10_000
    checkpoint_every: int = 10_000
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10  # stop after this many skipped steps with NaN/inf loss or gradients
    num_threads: int | None = None  # CPU threads (None = torch default)
    progress: bool = True
    trackers: list[str] = field(default_factory=list)  # tensorboard and/or wandb; [] = metrics.jsonl only
    # FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients, optimizer state and EMA sharded over the
    # processes (docs/scaling.md); checkpoints stay full safetensors, the same files as a DDP or 1-process run
    fsdp: bool = False
    fsdp_reshard_after_forward: bool = True  # ZeRO-3 (less memory); false = ZeRO-2 (no re-gather for the backward)
    # REPA-E (Leng et al., ICCV 2025; docs/family.md): the VAE (data.vae) trains with the model, through the alignment
    # loss only (stop-gradient on the denoising loss), behind a latent BatchNorm; off = plain training, bit for bit
    end_to_end: bool = False
    vae_lr: float = 1e-4  # the VAE's optimizer param group (REPA-E: 1e-4, the SiT's lr)
    vae_align_coeff: float = 1.5  # the alignment term's weight in the VAE's loss (REPA-E's --vae-align-proj-coeff)
    vae_recon: Literal["l1", "mse"] = "l1"  # reconstruction loss of decode(z) vs the image (REPA-E: L1)
    vae_recon_coeff: float = 1.0
    vae_kl_coeff: float = 1e-6  # KL(posterior || N(0, I)), summed per image, batch mean
    vae_perceptual_coeff: float = 0.0  # LPIPS-VGG (REPA-E: 1.0); needs the `lpips` package and its VGG weights
    latent_bn_momentum: float = 0.1  # the latent BatchNorm's running-statistics momentum (REPA-E's --bn-momentum)


@dataclass
class Config:
    """Everything a run needs; written resolved to `<run_dir>/config.yaml`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        validate(self)
