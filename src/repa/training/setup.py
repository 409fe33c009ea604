"""Builders that turn a Config into the run's pieces: encoders, cached targets, model, loss, sample grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from repa import distributed as D
from repa.config import Config
from repa.training.batches import generator
from repa.training.data import InMemoryImages, cache_dir, decode_pixels


def is_shards(data: Any) -> bool:
    """Latent shards from `repa prepare` (targets stored beside the latents) rather than in-memory images."""
    return not isinstance(data, InMemoryImages)


def needs_encoders(cfg: Config, data: Any) -> bool:
    """Whether the encoders must be loaded: REPA on, and targets not already stored in latent shards."""
    r = cfg.repa
    if not r.enabled:
        return False
    if is_shards(data):
        if r.cache_targets:
            data.check_encoders(r.encoders, r.encoder_resolution, r.encoder_layer)
            return False
        if not data.has_images:
            raise ValueError("repa.cache_targets=false on latent shards runs the encoders on the stored images: "
                             "prepare them with `repa prepare --images`")  # fmt: skip
    return True


def target_specs(cfg: Config, data: Any, encoders: list[nn.Module]) -> list[tuple[str, int, tuple[int, int]]]:
    """(name, embed_dim, token_grid) of each alignment target: from the loaded encoders or the shard manifest."""
    if encoders:
        return [(e.name, e.embed_dim, tuple(e.token_grid)) for e in encoders]
    if cfg.repa.enabled and is_shards(data):
        return [(e["name"], int(e["embed_dim"]), tuple(e["token_grid"])) for e in data.encoders]
    return []


def online_encoders(data: Any, encoders: list[nn.Module]) -> list[nn.Module]:
    """The encoders to run every step: those whose targets are neither cached nor stored."""
    if is_shards(data):
        return encoders  # loaded only when the shards hold no targets (needs_encoders)
    return encoders if not data.targets else []


def build_encoders(cfg: Config, device: torch.device) -> list[nn.Module]:
    """The frozen target encoders named in `cfg.repa` (none for vanilla training)."""
    from repa.encoders import load_encoder

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


def prepare_targets(cfg: Config, data: InMemoryImages, encoders: list[nn.Module], acc: Any) -> None:
    """Compute (once, cached across runs) each encoder's patch tokens for every training image, both flips.

    Rank 0 builds missing caches while the others wait; then every rank memory-maps them into `data.targets`.
    """
    if not encoders or not cfg.repa.cache_targets or is_shards(data):
        return
    from repa.data.features import TargetCache, build_target_cache

    flips = (False, True) if cfg.data.hflip else (False,)
    paths = [target_cache_path(cfg, data, enc) for enc in encoders]
    if acc.is_main_process:
        for enc, path in zip(encoders, paths):
            if not path.exists():
                D.print0(f"[repa] computing {enc.name} targets for {data.num_items} images -> {path}")
            # an existing cache is reused only if its metadata (encoder, weights source, images) matches
            build_target_cache(enc, data.images, path, flips=flips, progress=cfg.train.progress)
    acc.wait_for_everyone()
    data.targets = [TargetCache.load(p).tensor for p in paths]


def build_model(cfg: Config, data: Any, targets: list[tuple[str, int, tuple[int, int]]]) -> nn.Module:
    """The diffusion transformer sized for the data, with one projector per alignment target (`target_specs`)."""
    from repa.models import build_model as build

    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("hidden_size", "depth", "num_heads", "mlp_ratio", "align_depth")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    c, h, w = data.sample_shape
    if h != w:
        raise ValueError(f"training images must be square, got {h}x{w}")
    model = build(
        m.name,
        input_size=h,
        in_channels=c,
        num_classes=data.num_classes,
        class_dropout_prob=m.class_dropout_prob,
        encoder_dims=[dim for _, dim, _ in targets],
        projector_dim=m.projector_dim,
        qk_norm=m.qk_norm,
        **overrides,
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


class StepLoss:
    """Adapts RepaLoss to the loop's pre-drawn randomness (uniform u, noise, label-drop mask)."""

    def __init__(self, cfg: Config) -> None:
        from repa.losses import RepaLoss
        from repa.transport import time_from_uniform

        self.cfg = cfg
        self.time_from_uniform = time_from_uniform
        self.loss = RepaLoss(
            path=cfg.transport.path,
            prediction=cfg.transport.prediction,
            time_sampling=cfg.transport.time_sampling,
            align_coeff=cfg.repa.align_coeff if cfg.repa.enabled else 0.0,
            align_kind=cfg.repa.align_kind,
            resample=cfg.repa.resample_tokens,
            diffusion=cfg.transport.diffusion,
        )

    def __call__(self, model, x, y, targets, *, u, noise, drop) -> dict[str, torch.Tensor]:
        # flow: t from the configured distribution; DDPM: u in [0, 1) maps to timestep floor(u * T)
        tp = self.cfg.transport
        t = u if tp.diffusion == "ddpm" else self.time_from_uniform(u, tp.time_sampling, path=tp.path)
        return self.loss(model, x, y, targets if self.cfg.repa.enabled else None, t=t, noise=noise,
                         model_kwargs={"force_drop_ids": drop.long()})  # fmt: skip


def compile_model(model: nn.Module, memory_budget: float | None = None) -> nn.Module:
    """`torch.compile(model)` with the compiled backward's activation memory budget (`train.compile_memory_budget`:
    below 1 the cheapest ops are recomputed instead of saved; None = the compiler's default, 1.0). The budget is a
    process-wide compiler setting, read when the first call compiles."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = 1.0 if memory_budget is None else memory_budget
    return torch.compile(model)


def build_loss(cfg: Config) -> StepLoss:
    return StepLoss(cfg)


@torch.no_grad()
def generate(
    model: nn.Module, cfg: Config, labels: torch.Tensor, sample_shape: tuple[int, ...], seed: int
) -> torch.Tensor:
    """Samples x (float, data space) for `labels` with the sampler in `cfg.sample` (EMA model, eval mode)."""
    from repa.samplers import euler_maruyama_sampler, euler_sampler, model_velocity_fn

    s = cfg.sample
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = generator(seed, 3)
    noise = torch.randn((len(labels), *sample_shape), generator=g).to(device)
    fn = model_velocity_fn(model)
    common = dict(cfg_scale=s.cfg_scale, guidance_low=s.guidance_low, guidance_high=s.guidance_high,
                  null_label=model.num_classes)  # fmt: skip
    if cfg.transport.diffusion == "ddpm" or getattr(model, "learn_sigma", False):  # DiT: ancestral DDPM sampling
        from repa.transport.ddpm import cfg_eps_fn, create_diffusion, ddpm_model_fn

        eps_fn = ddpm_model_fn(model)
        if s.cfg_scale > 1:
            eps_fn = cfg_eps_fn(eps_fn, s.cfg_scale, model.num_classes)
        x = create_diffusion(str(s.num_steps)).p_sample_loop(
            eps_fn, noise, labels.to(device), generator=generator(seed, 4)
        )
    elif s.sampler == "ode":
        x = euler_sampler(fn, noise, labels.to(device), num_steps=s.num_steps, heun=s.heun, **common)
    else:
        x = euler_maruyama_sampler(fn, noise, labels.to(device), num_steps=s.num_steps, path=cfg.transport.path,
                                   generator=generator(seed, 4), **common)  # fmt: skip
    model.train(was_training)
    return x.float()


def grid_labels(num: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., num_classes-1, 0, 1, ... so each grid row cycles the classes."""
    return torch.arange(num) % num_classes


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, min_cell: int = 64) -> None:
    """uint8 (B, C, H, W) -> one PNG grid with a 2-pixel border; cells smaller than `min_cell` pixels are
    enlarged by an integer factor (nearest neighbour) so small images stay legible."""
    from PIL import Image

    scale = max(1, min_cell // images.shape[-1])
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    b, c, h, w = images.shape
    ncol = nrow
    nrows = (b + ncol - 1) // ncol
    pad = 2
    canvas = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, q = divmod(i, ncol)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = (
            images[i]
        )
    arr = canvas.permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)


_DECODERS: dict[str, Any] = {}


def decoder(data: Any, device: torch.device | str = "cpu"):
    """x (data space) -> uint8 images: pixels directly, latents through the VAE the shards were prepared with."""
    if not is_shards(data):
        return decode_pixels
    spec = data.manifest["config"]["vae"]
    if spec not in _DECODERS:  # load once per process
        from repa.data.vae import load_vae

        _DECODERS[spec] = load_vae(spec, device).decode_to_uint8
    return _DECODERS[spec]


def sample_grid(cfg: Config, model: nn.Module, data: Any, path: Path) -> None:
    """A grid of `cfg.sample.num_images` EMA samples, one class per column (at most 10 columns)."""
    n = cfg.sample.num_images
    labels = grid_labels(n, data.num_classes)
    x = generate(model, cfg, labels, data.sample_shape, cfg.sample.seed)
    device = next(model.parameters()).device
    save_grid(decoder(data, device)(x.to(device)).cpu(), path, nrow=min(data.num_classes, n, 10))
