"""Vision transformers through `transformers`: DINOv2 (+registers), DINOv3, CLIP, SigLIP (and SigLIP 2's fixed-
resolution checkpoints, which share SigLIP's architecture), MAE, I-JEPA, and a plain ViT (MoCo v3). One wrapper; the
families differ only in model class, prefix tokens, final norm and forward options.

Tokens are the last run block's output after the model's final LayerNorm, without CLS/register tokens. With
`layer=k` the block list is cut after block k, so later blocks are never run (and the final norm still applies).
`encode` also gives the global token (the CLS token after the final norm; the mean patch token for SigLIP and I-JEPA,
which have none) and the attention maps of chosen blocks, read from their query/key projections.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
from torch import nn

from repa.encoders.base import (
    CLIP_MEAN,
    CLIP_STD,
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderOutput,
)


@dataclass(frozen=True)
class Family:
    """How to build and run one transformers model family."""

    model_class: str
    config_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cls_token: bool  # one CLS token before the patches
    post_norm: str | None = None  # final norm the model does NOT apply to last_hidden_state itself (CLIP)
    config_defaults: tuple[tuple[str, object], ...] = ()  # forced options (MAE: no masking; SigLIP: no pooling head)


FAMILIES: dict[str, Family] = {
    "dinov2": Family("Dinov2Model", "Dinov2Config", IMAGENET_MEAN, IMAGENET_STD, True),
    "dinov2-reg": Family("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", IMAGENET_MEAN, IMAGENET_STD, True),
    # DINOv3 ViT: CLS, then `num_register_tokens` (4) registers, then patches; RoPE on the patch tokens only (no
    # position table: any resolution that the patch size divides), final `norm` applied by the model itself.
    "dinov3": Family("DINOv3ViTModel", "DINOv3ViTConfig", IMAGENET_MEAN, IMAGENET_STD, True),
    "clip": Family("CLIPVisionModel", "CLIPVisionConfig", CLIP_MEAN, CLIP_STD, True, post_norm="post_layernorm"),
    "siglip": Family(
        "SiglipVisionModel",
        "SiglipVisionConfig",
        HALF_MEAN,
        HALF_STD,
        False,
        config_defaults=(("vision_use_head", False),),
    ),
    "mae": Family(
        "ViTMAEModel", "ViTMAEConfig", IMAGENET_MEAN, IMAGENET_STD, True, config_defaults=(("mask_ratio", 0.0),)
    ),
    "ijepa": Family("IJepaModel", "IJepaConfig", IMAGENET_MEAN, IMAGENET_STD, False),
    "vit": Family("ViTModel", "ViTConfig", IMAGENET_MEAN, IMAGENET_STD, True),
}


def _blocks(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) holding the model's transformer blocks."""
    found = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers and name
    ]
    if len(found) != 1:
        raise RuntimeError(f"cannot locate the block list of {type(model).__name__} ({[n for n, _ in found]})")
    name, blocks = found[0]
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr, blocks


def truncate_blocks(model: nn.Module, k: int) -> None:
    """Keep blocks 1..k of a transformers ViT in place (later blocks are dropped and never run)."""
    n = model.config.num_hidden_layers
    if not 1 <= k <= n:
        raise ValueError(f"layer must be in [1, {n}], got {k}")
    parent, attr, blocks = _blocks(model, n)
    setattr(parent, attr, nn.ModuleList(list(blocks)[:k]))
    model.config.num_hidden_layers = k


def build_config(family: str, config: dict, overrides: dict | None = None):
    """A transformers config of `family` from kwargs (the registry's architecture) plus overrides (tests)."""
    import transformers

    fam = FAMILIES[family]
    kwargs = {**config, **(overrides or {}), **dict(fam.config_defaults)}
    return getattr(transformers, fam.config_class)(**kwargs)


def build_random(family: str, config: dict, overrides: dict | None = None, seed: int = 0) -> nn.Module:
    """The family's model with its own random initialisation, reproducible given `seed`."""
    import transformers

    cfg = build_config(family, config, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = getattr(transformers, FAMILIES[family].model_class)
        return cls(cfg, add_pooling_layer=False) if family == "vit" else cls(cfg)


def from_pretrained(family: str, path_or_id: str, local_files_only: bool) -> nn.Module:
    """`Model.from_pretrained` with the family's forced options (MAE mask_ratio 0, SigLIP without its head)."""
    import transformers

    fam = FAMILIES[family]
    cls = getattr(transformers, fam.model_class)
    kwargs = dict(fam.config_defaults)
    if family == "vit":
        kwargs["add_pooling_layer"] = False
    return cls.from_pretrained(path_or_id, local_files_only=local_files_only, **kwargs)


class HFEncoder(Encoder):
    """Patch tokens of a transformers vision transformer, after its final LayerNorm, prefix tokens removed."""

    def __init__(
        self, name: str, family: str, model: nn.Module, resolution: int, layer: int | None = None, source: str = ""
    ) -> None:
        fam = FAMILIES[family]
        cfg = model.config
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        super().__init__(name, cfg.hidden_size, patch, resolution, fam.mean, fam.std, layer, source)
        if layer is not None and layer != cfg.num_hidden_layers:
            truncate_blocks(model, layer)
        self.family = family
        self.model = model
        self.global_token_kind = "cls" if fam.cls_token else "mean"
        self.num_prefix = int(fam.cls_token) + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.native_resolution = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        if family == "mae" and getattr(cfg, "mask_ratio", 0.0) != 0.0:
            raise ValueError(f"{name}: MAE must run with mask_ratio 0 (got {cfg.mask_ratio})")
        self.freeze()

    def _sequence(self, pixels: torch.Tensor) -> torch.Tensor:
        """All output tokens (B, prefix + N, D) after the final norm (prefix: CLS, then registers)."""
        kwargs: dict = {}
        # DINOv2 always interpolates its position embeddings; DINOv3 has none (RoPE, computed for the input's grid)
        if self.family not in ("dinov2", "dinov2-reg", "dinov3"):
            kwargs["interpolate_pos_encoding"] = pixels.shape[-1] != self.native_resolution
        if self.family == "mae":  # MAE shuffles tokens by argsort(noise) even at mask_ratio 0: keep the order
            b, n = pixels.shape[0], self.num_tokens
            kwargs["noise"] = torch.arange(n, device=pixels.device, dtype=torch.float32).expand(b, n)
        tokens = self.model(pixel_values=pixels, **kwargs).last_hidden_state
        post_norm = FAMILIES[self.family].post_norm
        if post_norm is not None:
            tokens = getattr(self.model, post_norm)(tokens)
        return tokens

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._sequence(pixels)[:, self.num_prefix :]

    def _encode(self, pixels: torch.Tensor, attention_layers: tuple[int, ...]) -> EncoderOutput:
        blocks = _blocks(self.model, self.model.config.num_hidden_layers)[2]
        bad = [a for a in attention_layers if not 1 <= a <= len(blocks)]
        if bad:
            raise ValueError(
                f"encoder {self.name!r}: attention_layers must be in [1, {len(blocks)}] (the blocks it runs), got {bad}"
            )
        logits: dict[int, torch.Tensor] = {}
        hooks = [
            _attention_module(blocks[a - 1]).register_forward_pre_hook(_logit_hook(logits, a), with_kwargs=True)
            for a in attention_layers
        ]
        try:
            seq = self._sequence(pixels)
        finally:
            for hook in hooks:
                hook.remove()
        p = self.num_prefix
        attn = {a: logits[a][:, :, p:, p:].float().softmax(dim=-1) for a in attention_layers}  # HASTE: CLS dropped
        glob = seq[:, 0] if self.global_token_kind == "cls" else seq[:, p:].mean(dim=1)
        return EncoderOutput(seq[:, p:], glob, attn)


def _attention_module(block: nn.Module) -> nn.Module:
    """The self-attention of a transformers ViT block: the submodule with `q_proj` and `k_proj` (every family)."""
    found = [m for m in block.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if len(found) != 1:
        raise RuntimeError(f"cannot locate the attention of {type(block).__name__}")
    return found[0]


def _logit_hook(store: dict[int, torch.Tensor], layer: int):
    """A forward pre-hook storing the attention logits Q K^T * scale (B, heads, T, T) of the module's input."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        b, t, _ = h.shape
        q = module.q_proj(h).view(b, t, -1, module.head_dim).transpose(1, 2)
        k = module.k_proj(h).view(b, t, -1, module.head_dim).transpose(1, 2)
        rope = kwargs.get("position_embeddings")
        if rope is not None:  # DINOv3: the attention rotates the patch queries/keys (RoPE) before Q K^T
            from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

            q, k = apply_rotary_pos_emb(q, k, *rope)
        scale = getattr(module, "scaling", None) or getattr(module, "scale", module.head_dim**-0.5)
        store[layer] = (q.float() * scale) @ k.float().transpose(-2, -1)

    return hook


# torch-hub DINOv2 (facebookresearch/dinov2 `hub/backbones.py`): the position-table resampling of the released models,
# (interpolate_offset, interpolate_antialias): (0.1, False) without registers, (0.0, True) with registers.
HUB_POSITION_INTERPOLATION = {"dinov2": (0.1, False), "dinov2-reg": (0.0, True)}


def use_hub_position_interpolation(model: nn.Module, family: str) -> None:
    """Make a transformers DINOv2 resample its position table as the torch-hub DINOv2 does (in place).

    transformers resamples the 37x37 table bicubically to `size=(h, w)`; the hub model (`vision_transformer.py`,
    `interpolate_pos_encoding`) passes `scale_factor=((h + offset) / 37, (w + offset) / 37)` with offset 0.1 (a
    "historical kludge", kept for backward compatibility) and no antialiasing, or `size` with antialiasing for the
    register models. The two differ slightly away from the native 518 px; the hub version is what EDM2's FD_DINOv2
    (`torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`) and dgm-eval compute with.

    Args:
        model: a `Dinov2Model` / `Dinov2WithRegistersModel`.
        family: "dinov2" or "dinov2-reg".
    """
    offset, antialias = HUB_POSITION_INTERPOLATION[family]

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        table = self.position_embeddings
        num_positions = table.shape[1] - 1
        ph, pw = self.patch_embeddings.patch_size
        h0, w0 = height // ph, width // pw
        if h0 * w0 == num_positions and height == width:
            return table
        m = int(math.sqrt(num_positions))
        dim = table.shape[-1]
        grid = table[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
        size_kw = {"scale_factor": ((h0 + offset) / m, (w0 + offset) / m)} if offset else {"size": (h0, w0)}
        grid = torch.nn.functional.interpolate(grid, mode="bicubic", antialias=antialias, **size_kw)
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"hub position interpolation gave {tuple(grid.shape[-2:])}, expected {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([table[:, :1].float(), grid], dim=1).to(table.dtype)

    model.embeddings.interpolate_pos_encoding = types.MethodType(interpolate_pos_encoding, model.embeddings)


def mocov3_to_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MoCo v3 ViT checkpoint (timm layout; `module.base_encoder.` prefix, momentum encoder/predictor/head ignored)
    -> transformers 5.x `ViTModel(add_pooling_layer=False)` state dict. The fused qkv is split into q, k, v.

    Args:
        state: a checkpoint dict; `state_dict`/`model` containers are unwrapped.

    Returns:
        A state dict for strict loading.
    """
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.base_encoder.", "base_encoder.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if key.startswith(("momentum_encoder.", "predictor.", "head.", "fc_norm.")):
            continue  # not part of the backbone; anything else unknown is caught by the strict load
        parts = key.split(".")
        if key == "cls_token":
            out["embeddings.cls_token"] = value
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = value
        elif parts[0] == "patch_embed":
            out[f"embeddings.patch_embeddings.projection.{parts[-1]}"] = value
        elif parts[0] == "norm":
            out[f"layernorm.{parts[-1]}"] = value
        elif parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            base = f"layers.{i}."
            if rest.startswith("attn.qkv."):
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}attention.{name}.{parts[-1]}"] = chunk.clone()
            else:
                mapped = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj"}
                mod = rest.rsplit(".", 1)[0]
                out[f"{base}{mapped.get(mod, mod)}.{parts[-1]}"] = value
    return out
