"""Typed run configuration: component dataclasses composed into `Config`; YAML presets + dotted overrides."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


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

    @property
    def enabled(self) -> bool:
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
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay = min(ema_decay, (1 + step) / (10 + step)); useful for short runs


@dataclass
class SampleConfig:
    """Sampling for periodic grids and `repa sample`."""

    sampler: Literal["ode", "sde"] = "sde"
    num_steps: int = 250
    heun: bool = False
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 0.7
    num_images: int = 64
    seed: int = 0


@dataclass
class TrainConfig:
    """The loop: batch, duration, precision, cadence of logs/samples/checkpoints."""

    run_dir: str = "runs/default"
    seed: int = 0
    global_batch_size: int = 256
    grad_accum_steps: int = 1
    max_steps: int = 400_000
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
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


# ----------------------------------------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int = 1) -> None:
    """Cross-field checks that can be made before any work. Raises ValueError naming the problem."""
    t, d, r = cfg.train, cfg.data, cfg.repa
    if t.global_batch_size < 1 or t.grad_accum_steps < 1:
        raise ValueError("train.global_batch_size and train.grad_accum_steps must be >= 1")
    if t.global_batch_size % (world_size * t.grad_accum_steps):
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"num_processes ({world_size}) x train.grad_accum_steps ({t.grad_accum_steps})"
        )
    if t.max_steps < 0:
        raise ValueError("train.max_steps must be >= 0")
    if d.kind == "fashion-mnist" and d.space != "pixel":
        raise ValueError("data.kind=fashion-mnist is grayscale 28x28 and trains in pixel space: set data.space=pixel")
    if d.kind == "latents" and d.space != "latent":
        raise ValueError("data.kind=latents holds VAE latents: set data.space=latent")
    if r.align_coeff < 0:
        raise ValueError("repa.align_coeff must be >= 0")
    if r.encoder_weights and len(r.encoder_weights) != len(r.encoders):
        raise ValueError("repa.encoder_weights must give one path per entry of repa.encoders")
    if cfg.transport.diffusion == "ddpm" and cfg.transport.path != "linear":
        raise ValueError("transport.path only applies to diffusion=flow")
    if not 0.0 <= cfg.sample.guidance_low <= cfg.sample.guidance_high <= 1.0:
        raise ValueError("sample guidance interval must satisfy 0 <= guidance_low <= guidance_high <= 1")
    if cfg.model.align_depth is not None and cfg.model.depth is not None and cfg.model.align_depth > cfg.model.depth:
        raise ValueError(f"model.align_depth={cfg.model.align_depth} exceeds model.depth={cfg.model.depth}")
    _check_ranges(cfg)
    _check_model(cfg)


def _check_ranges(cfg: Config) -> None:
    """Numbers that would otherwise fail mid-run (a zero cadence divides by zero after the first step)."""
    t, o, d, m = cfg.train, cfg.optim, cfg.data, cfg.model
    positive = {"train.log_every": t.log_every, "train.sample_every": t.sample_every,
                "train.checkpoint_every": t.checkpoint_every, "data.resolution": d.resolution,
                "repa.encoder_resolution": cfg.repa.encoder_resolution, "sample.num_steps": cfg.sample.num_steps,
                "sample.num_images": cfg.sample.num_images, "train.num_threads": t.num_threads,
                "data.num_train": d.num_train}  # fmt: skip
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    non_negative = {"train.keep_checkpoints": t.keep_checkpoints, "train.max_nonfinite_steps": t.max_nonfinite_steps,
                    "optim.lr": o.lr, "optim.warmup_steps": o.warmup_steps, "optim.grad_clip": o.grad_clip,
                    "optim.weight_decay": o.weight_decay, "data.num_workers": d.num_workers}  # fmt: skip
    for key, value in non_negative.items():
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    if not 0.0 <= o.ema_decay <= 1.0:
        raise ValueError(f"optim.ema_decay must be in [0, 1], got {o.ema_decay}")
    if not 0.0 <= m.class_dropout_prob < 1.0:
        raise ValueError(f"model.class_dropout_prob must be in [0, 1), got {m.class_dropout_prob}")
    if t.compile_memory_budget is not None and not 0.0 < t.compile_memory_budget <= 1.0:
        raise ValueError(f"train.compile_memory_budget must be in (0, 1], got {t.compile_memory_budget}")
    if not t.run_dir.strip():
        raise ValueError("train.run_dir must name a folder")


def _check_model(cfg: Config) -> None:
    """The model name and the depth the projectors read, with the registry's values where the config has none."""
    from repa.models import MODELS

    m = cfg.model
    if m.name not in MODELS:
        close = difflib.get_close_matches(m.name, list(MODELS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(MODELS)}"
        raise ValueError(f"model.name={m.name!r} is not a registered model ({hint})")
    reg = MODELS[m.name]
    depth = m.depth if m.depth is not None else reg["depth"]
    align = m.align_depth if m.align_depth is not None else reg["align_depth"]
    if (m.align_depth is not None or cfg.repa.enabled) and not 1 <= align <= depth:
        src = "" if m.depth is not None else f" (the depth of {m.name}; set model.depth to change it)"
        what = "model.align_depth" if m.align_depth is not None else f"{m.name}'s default align_depth"
        raise ValueError(f"{what}={align} must be in [1, {depth}]{src}")
    hidden = m.hidden_size if m.hidden_size is not None else reg["hidden_size"]
    heads = m.num_heads if m.num_heads is not None else reg["num_heads"]
    if hidden % heads:
        raise ValueError(f"model hidden_size={hidden} is not divisible by num_heads={heads}")


# --------------------------------------------------------------------------------------- typed (de)serialisation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (converting only where lossless), or raise ValueError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and "no" in args and not value:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise ValueError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if origin is list and isinstance(value, str):
                value = [v for v in value.split(",") if v]  # `repa.encoders=a,b` on the command line
            else:
                raise ValueError(f"{key}: expected a list, got {value!r}")
        if origin is list:
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise ValueError(f"{key}: unsupported type {tp}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
            raise ValueError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict holding only the keys that differ from the defaults."""
    return _from_dict(Config, data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.max_steps=200", "repa.encoders=[a,b]"]` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"override '{item}': key must be dotted, e.g. train.max_steps=200")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML preset (safe-loaded; may name a `base:` preset beside it) <- dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(Path(path))
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(data)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a preset; `base: other.yaml` (relative to the file) is loaded first and updated by the rest."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of sections")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(load_yaml(path.parent / base), data)
    return data


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (safe dump: plain types only), atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
