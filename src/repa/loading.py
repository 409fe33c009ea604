"""Reading checkpoints for inference and fine-tuning: one module for every checkpoint kind (repa folders, official
REPA `last.pt`, public SiT/DiT files, safetensors, bare state dicts). What the weights mean is `repa.convert`'s
business (pure state-dict maps); this module reads files, never unpickling anything but allow-listed plain data."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from repa.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from repa.config import Config, from_dict
from repa.convert import Format, SiTWrapper, detect_format, infer_model_kwargs, sit_to_repa_state_dict
from repa.models import DiffusionTransformer


def load_model_weights(path: str | Path, prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights for inference from any supported file, never unpickling arbitrary objects.

    Accepts a repa checkpoint folder, a `.safetensors` file, or an official REPA/DiT/SiT `.pt` file (a bare
    state dict, or a dict with `model`/`ema` entries; the argparse Namespace official REPA stores under
    `args` is allow-listed as plain data). Returns (state_dict, info) where info describes the source.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        ckpt = load_checkpoint(path, optimizer=False)
        use_ema = prefer_ema and ckpt["ema"] is not None
        return (ckpt["ema"] if use_ema else ckpt["model"]), {"format": "repa", "ema": use_ema, **ckpt["state"]}
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), {"format": "safetensors", "ema": False}
        except Exception as err:  # noqa: BLE001 - SafetensorError (not a safetensors file, truncated), OSError
            raise CheckpointError(f"could not read {path}: {type(err).__name__}: {err}") from err
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError subclasses and others
            raise CheckpointError(
                f"refusing to load {path}: it is not a plain tensor checkpoint ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}). Only safetensors and weights_only-loadable files are accepted."
            ) from err
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        key = "ema" if prefer_ema and "ema" in obj else "model"
        info = {"format": "official", "ema": key == "ema", "step": obj.get("steps")}
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            info["args"] = vars(args)
        return obj[key], info
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {"format": "state_dict", "ema": False}
    raise CheckpointError(f"{path}: unrecognised checkpoint layout (keys: {list(obj)[:8]})")


def _read(
    source: str | Path | Mapping[str, Tensor], prefer_ema: bool, format: Format | None, convert_sit: bool,
    num_heads: int | None, align_depth: int | None,
) -> tuple[dict[str, Tensor], dict[str, Any], Format, dict[str, Any]]:  # fmt: skip
    """(state dict, info, convention, model kwargs) of a source, SiT weights in REPA's convention if `convert_sit`."""
    if isinstance(source, Mapping):
        state, info = dict(source), {"format": "state_dict", "ema": False}
    else:
        state, info = load_model_weights(source, prefer_ema=prefer_ema)
        state, info = dict(state), {**info, "filename": Path(source).name}
    hints = {"format": format, "filename": info.get("filename"), "source": info.get("format"), "args": info.get("args")}
    fmt = detect_format(state, hints)
    if fmt == "sit" and convert_sit:
        state = sit_to_repa_state_dict(state)
    return state, info, fmt, infer_model_kwargs(state, num_heads, align_depth=align_depth, info=info)


def load_official(
    source: str | Path | Mapping[str, Tensor],
    *,
    format: Format | None = None,
    sit: Literal["convert", "wrap"] = "convert",
    prefer_ema: bool = True,
    num_heads: int | None = None,
    align_depth: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load any supported checkpoint for sampling, evaluation and analysis, in REPA's conventions (eval mode).

    Args:
        source: a file (`last.pt`, `SiT-XL-2-256x256.pt`, `DiT-XL-2-256x256.pt`, .safetensors), a repa checkpoint
            folder, or a state dict.
        format: force "repa" / "sit" / "dit" instead of `detect_format`.
        sit: "convert" (default) folds SiT's conventions into the weights (`sit_to_repa_state_dict`: a plain
            REPA-convention DiffusionTransformer); "wrap" keeps the weights and returns a `SiTWrapper`.
        prefer_ema: take the EMA weights when the checkpoint has them.
        num_heads: attention heads (default: qk-norm weights, the checkpoint's config/args, the registry width;
            see `repa.convert.infer_model_kwargs`, which raises when none says it).
        align_depth: the block feeding the projectors, for checkpoints with projectors (default: config/args, the
            registry size).

    Returns:
        (model, info): repa/dit -> DiffusionTransformer (a DiT samples with `repa.transport.ddpm`); sit -> a
        converted DiffusionTransformer or a SiTWrapper. info has `format` (the detected convention), `model_kwargs`
        and what `load_model_weights` reports.
    """
    state, info, fmt, kwargs = _read(source, prefer_ema, format, sit == "convert", num_heads, align_depth)
    model = DiffusionTransformer(**kwargs)
    model.load_state_dict(state, strict=True)
    model.eval()
    out: nn.Module = SiTWrapper(model).eval() if fmt == "sit" and sit == "wrap" else model
    return out, {**info, "source_format": info.get("format"), "format": fmt, "model_kwargs": kwargs}


def load_for_finetuning(
    source: str | Path | Mapping[str, Tensor],
    *,
    encoder_dims: Iterable[int],
    align_depth: int = 8,
    projector_dim: int = 2048,
    format: Format | None = None,
    prefer_ema: bool = True,
    num_heads: int | None = None,
    class_dropout_prob: float = 0.1,
) -> tuple[nn.Module, dict[str, Any]]:
    """An official SiT/DiT (or REPA) checkpoint as a repa model with REPA projectors, ready for training.

    SiT weights are converted to REPA's convention (`sit_to_repa_state_dict`, C outputs); DiT weights stay a
    learned-Sigma DDPM model (train with `transport.diffusion=ddpm`). Backbone keys load strictly: a missing
    or unexpected backbone key is an error. Projectors are freshly initialised (the model's own init; seed the
    global RNG first for reproducibility) unless the checkpoint has projectors of exactly these shapes.

    Args:
        source: file, repa checkpoint folder, or state dict.
        encoder_dims: one projector output width per target encoder (768 for DINOv2-B).
        align_depth: 1-indexed block feeding the projectors.
        projector_dim: projector hidden width.
        format: force the convention instead of `detect_format`.
        prefer_ema: start from the EMA weights when present.
        num_heads: attention heads (default: inferred, see `load_official`).
        class_dropout_prob: label dropout for classifier-free guidance.

    Returns:
        (model in train mode, report) with report keys `format`, `new_keys` (freshly initialised),
        `dropped_keys` (checkpoint projectors not used), `model_kwargs`.
    """
    state, info, fmt, kwargs = _read(source, prefer_ema, format, True, num_heads, align_depth)
    kwargs.update(encoder_dims=[int(d) for d in encoder_dims], align_depth=align_depth, projector_dim=projector_dim,
                  class_dropout_prob=class_dropout_prob)  # fmt: skip
    model = DiffusionTransformer(**kwargs)
    own = model.state_dict()
    old_proj = {k: v for k, v in state.items() if k.startswith("projectors.")}
    reuse = old_proj.keys() == {k for k in own if k.startswith("projectors.")} and all(
        own[k].shape == v.shape for k, v in old_proj.items()
    )
    load = {k: v for k, v in state.items() if reuse or not k.startswith("projectors.")}
    try:
        missing, unexpected = model.load_state_dict(load, strict=False)
    except RuntimeError as err:
        raise ValueError(f"checkpoint does not fit the model: {str(err).splitlines()[-1].strip()}") from err
    bad_missing = [k for k in missing if not k.startswith("projectors.")]
    if bad_missing or unexpected:
        raise ValueError(f"backbone keys do not match: missing {bad_missing[:8]}, unexpected {list(unexpected)[:8]}")
    model.train()
    report = {"format": fmt, "new_keys": sorted(missing), "dropped_keys": sorted(set(old_proj) - set(load)),
              "model_kwargs": kwargs, "source_format": info.get("format")}  # fmt: skip
    return model, report


@dataclass
class LoadedModel:
    """A checkpoint ready for inference: the model, its run config and where it came from."""

    model: nn.Module
    cfg: Config  # defaults for official checkpoints
    info: dict[str, Any]
    path: Path

    @property
    def is_repa(self) -> bool:
        return "config" in self.info

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        k = self.info["model_kwargs"]
        return (k["in_channels"], k["input_size"], k["input_size"])

    @property
    def num_classes(self) -> int:
        return int(self.info["model_kwargs"]["num_classes"])

    @property
    def num_heads(self) -> int:
        return int(self.info["model_kwargs"]["num_heads"])

    @property
    def align_depth(self) -> int | None:
        """The block feeding the projectors; None without projectors."""
        return self.info["model_kwargs"].get("align_depth")

    def vae(self, override: str | None = None) -> str | None:
        """The VAE (a `repa.data.vae_spec.load_vae` spec) that decodes this model's samples: None for pixel-space
        models, else `override`, the checkpoint's own tuned VAE (REPA-E: `vae.safetensors`, with its latent
        BatchNorm's statistics) or the run's `data.vae` (official checkpoints are SD-VAE latent models)."""
        if self.cfg.data.space != "latent":
            return None
        tuned = self.path / "vae.safetensors"
        return override or (str(tuned) if self.path.is_dir() and tuned.is_file() else self.cfg.data.vae)

    @property
    def run_dir(self) -> Path | None:
        """The run folder of a repa checkpoint (`<run>/checkpoints/step_*`), else None."""
        return self.path.parent.parent if self.is_repa else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder -> its newest checkpoint; a checkpoint folder or file is returned as is."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir() and not (path / "state.json").exists():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"{path} is neither a checkpoint nor a run folder with checkpoints/step_*")
        return found
    return path


def load_model(
    checkpoint: str | Path,
    prefer_ema: bool = True,
    device: str | torch.device = "cpu",
    *,
    num_heads: int | None = None,
    align_depth: int | None = None,
) -> LoadedModel:
    """Load a repa run/checkpoint or an official checkpoint for inference (EMA weights by default).

    `num_heads` and `align_depth` (the `--num-heads` / `--align-depth` flags) state what neither the weights nor the
    checkpoint's config/args say (see `load_official`)."""
    path = resolve_checkpoint(checkpoint)
    model, info = load_official(path, prefer_ema=prefer_ema, num_heads=num_heads, align_depth=align_depth)
    cfg = from_dict(info["config"]) if "config" in info else from_dict({})
    return LoadedModel(model.to(device).eval(), cfg, info, path)
