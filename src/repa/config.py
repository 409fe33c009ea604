"""Typed run configuration: component dataclasses composed into `Config`; YAML presets + dotted overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from repa.errors import ReportedError


class ConfigError(ReportedError, ValueError):
    """A config value, preset file or override that cannot run; the message names the key or the file."""

    exit_code = 2


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

MAX_LR = 1.0  # AdamW moves every weight by about lr per step: above this no run can train
DDPM_STEPS = 1000  # DDPM sampling respaces the 1000 training steps (DiT models and transport.diffusion=ddpm)
FASHION_MNIST_SIZE = 28


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every value and cross-field check that can be made before any work. Raises ConfigError (a ValueError)
    naming the key."""
    _check_finite(cfg)
    _check_ranges(cfg)
    t, d, r = cfg.train, cfg.data, cfg.repa
    if t.global_batch_size < 1 or t.grad_accum_steps < 1:
        raise ConfigError("train.global_batch_size and train.grad_accum_steps must be >= 1")
    if t.global_batch_size % (world_size * t.grad_accum_steps):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"num_processes ({world_size}) x train.grad_accum_steps ({t.grad_accum_steps})"
        )
    if t.max_steps < 0:
        raise ConfigError("train.max_steps must be >= 0")
    if d.kind == "fashion-mnist" and d.space != "pixel":
        raise ConfigError("data.kind=fashion-mnist is grayscale 28x28 and trains in pixel space: set data.space=pixel")
    if d.kind == "folder" and d.space != "pixel":
        raise ConfigError(
            "data.kind=folder trains on the images' pixels but data.space=latent: set data.space=pixel, or run "
            "`repa prepare` and train on its latents with data.kind=latents"
        )
    if d.kind == "latents" and d.space != "latent":
        raise ConfigError("data.kind=latents holds VAE latents: set data.space=latent")
    if r.align_coeff < 0:
        raise ConfigError("repa.align_coeff must be >= 0")
    if r.encoder_weights and len(r.encoder_weights) != len(r.encoders):
        raise ConfigError("repa.encoder_weights must give one path per entry of repa.encoders")
    if cfg.transport.diffusion == "ddpm" and cfg.transport.path != "linear":
        raise ConfigError("transport.path only applies to diffusion=flow")
    if not 0.0 <= cfg.sample.guidance_low <= cfg.sample.guidance_high <= 1.0:
        raise ConfigError("sample guidance interval must satisfy 0 <= guidance_low <= guidance_high <= 1")
    if cfg.model.align_depth is not None and cfg.model.depth is not None and cfg.model.align_depth > cfg.model.depth:
        raise ConfigError(f"model.align_depth={cfg.model.align_depth} exceeds model.depth={cfg.model.depth}")
    _check_optim(cfg.optim)
    _check_model(cfg)
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
    positive = {"train.log_every": t.log_every, "train.sample_every": t.sample_every,
                "train.checkpoint_every": t.checkpoint_every, "data.resolution": d.resolution,
                "repa.encoder_resolution": cfg.repa.encoder_resolution, "sample.num_steps": cfg.sample.num_steps,
                "sample.num_images": cfg.sample.num_images, "train.num_threads": t.num_threads,
                "data.num_train": d.num_train, "model.hidden_size": m.hidden_size, "model.depth": m.depth,
                "model.num_heads": m.num_heads, "model.projector_dim": m.projector_dim,
                "repa.encoder_layer": cfg.repa.encoder_layer}  # fmt: skip
    for key, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    non_negative = {"train.keep_checkpoints": t.keep_checkpoints, "train.max_nonfinite_steps": t.max_nonfinite_steps,
                    "optim.lr": o.lr, "optim.warmup_steps": o.warmup_steps, "optim.grad_clip": o.grad_clip,
                    "optim.weight_decay": o.weight_decay, "data.num_workers": d.num_workers}  # fmt: skip
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


def _check_model(cfg: Config) -> None:
    """The model name and the depth the projectors read, with the registry's values where the config has none."""
    from repa.models import MODELS

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
    if size is not None and size % patch:
        what = "Fashion-MNIST's 28 px" if d.kind == "fashion-mnist" else f"data.resolution={d.resolution}"
        raise ConfigError(f"{what} is not divisible by the patch size {patch} of model.name={m.name}")


def _check_sample(cfg: Config) -> None:
    """Sampling settings that would only fail at the first sample grid, or be silently ignored."""
    from repa.models import MODELS

    s = cfg.sample
    if s.cfg_scale < 1.0:
        raise ConfigError(f"sample.cfg_scale must be >= 1 (1 = no guidance; the samplers guide only above 1), "
                          f"got {s.cfg_scale}")  # fmt: skip
    if s.cfg_scale > 1.0 and cfg.model.class_dropout_prob == 0:
        raise ConfigError(f"sample.cfg_scale={s.cfg_scale} needs the unconditional (null) class that "
                          "model.class_dropout_prob > 0 trains: set one, or sample.cfg_scale=1")  # fmt: skip
    if cfg.transport.diffusion == "ddpm" or MODELS[cfg.model.name]["learn_sigma"]:
        why = "transport.diffusion=ddpm" if cfg.transport.diffusion == "ddpm" else f"model.name={cfg.model.name}"
        if s.num_steps > DDPM_STEPS:
            raise ConfigError(f"sample.num_steps={s.num_steps}: {why} samples with DDPM, which respaces its "
                              f"{DDPM_STEPS} steps: use at most {DDPM_STEPS}")  # fmt: skip


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
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and "no" in args and not value:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if origin is list and isinstance(value, str):
                value = [v for v in value.split(",") if v]  # `repa.encoders=a,b` on the command line
            else:
                raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is list:
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1) if isinstance(key, str) else []
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, {} if value is None else value, f"{full}.")
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
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override '{item}': key must be dotted, e.g. train.max_steps=200")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': {_yaml_problem(err)}") from err
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with the earlier '{'.'.join(parts[: i + 1])}=...'")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML preset (safe-loaded; may name a `base:` preset beside it) <- dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml(Path(path))
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(data)


def load_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset; `base: other.yaml` (relative to the file) is loaded first and updated by the rest."""
    if not path.is_file():
        of = f" (the base: of {_chain[-1]})" if _chain else ""
        raise FileNotFoundError(f"config file not found: {path}{of}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: must name a preset file relative to it (e.g. base: sit-b2.yaml), "
                          f"got {base!r}")  # fmt: skip
    chain, base_path = (*_chain, path), path.parent / base
    if any(os.path.realpath(base_path) == os.path.realpath(p) for p in chain):
        cycle = " -> ".join(str(p) for p in (*chain, base_path))
        raise ConfigError(f"{path}: base: {base} makes a cycle ({cycle}); a preset cannot be its own base")
    return _merge(load_yaml(base_path, chain), data)


def _read_yaml(path: Path) -> dict[str, Any]:
    """A preset's mapping (safe-loaded), or a ConfigError naming the file: not UTF-8, not YAML, a refused tag."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}): "
                          "save it as UTF-8") from err  # fmt: skip
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_yaml_problem(err)}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of sections")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: where and what (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or " ".join(line.strip() for line in str(err).splitlines())
    if isinstance(err, yaml.reader.ReaderError):  # its text names "<unicode string>", not the file
        where, problem = f" at character {err.position}", f"unacceptable character #x{err.character:04x}"
    if isinstance(err, yaml.constructor.ConstructorError):
        return (f"refused YAML{where}: {problem}; configs are plain YAML (mappings, lists, numbers, strings) and "
                "tags such as !!python/... are never constructed")  # fmt: skip
    return f"not valid YAML{where}: {problem}"


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (safe dump: plain types only), atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
