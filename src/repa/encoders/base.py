"""The frozen-encoder protocol: each encoder owns its preprocessing and returns patch tokens (B, N, D) float32."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)  # SigLIP: [0, 1] -> [-1, 1]
HALF_STD = (0.5, 0.5, 0.5)


def to_unit_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images (B, 1|3, H, W) -> float32 RGB in [0, 1] (grayscale repeated to 3).

    Args:
        images: (B, C, H, W) with C in {1, 3}; uint8 is divided by 255, floats are taken as already in [0, 1].

    Returns:
        (B, 3, H, W) float32.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1|3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif images.is_floating_point():
        x = images.float()
    else:
        raise TypeError(f"images must be uint8 in [0, 255] or float in [0, 1], got {images.dtype}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@dataclass
class EncoderOutput:
    """What `Encoder.encode` returns (all float32, no grad).

    Attributes:
        tokens: (B, N, D) patch tokens, exactly the default call's output.
        global_token: (B, D) the image's global token (REG's class token), or None when not asked: the CLS token
            after the final norm for families that have one (`Encoder.global_token_kind == "cls"`), else the mean
            of the patch tokens ("mean").
        attentions: {layer: (B, heads, N, N)} the attention of the asked 1-indexed layers restricted to the patch
            tokens: softmax over the patch keys of Q K^T / sqrt(d) (HASTE drops the CLS row and column of the
            teacher's logits before the softmax), so each row sums to 1.
    """

    tokens: torch.Tensor
    global_token: torch.Tensor | None = None
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)


class Encoder(nn.Module):
    """A frozen target encoder: `forward(images) -> (B, N, D)` patch tokens (no CLS/register tokens), no grad.

    Subclasses implement `_tokens(pixels) -> (B, N, D)` on preprocessed pixels (B, 3, resolution, resolution).
    Preprocessing (the official REPA recipe): /255 for uint8, normalise with the encoder's mean/std, then a bicubic
    resize to `resolution` (normalisation is a per-channel affine map and bicubic weights sum to one, so the order
    is immaterial). The module is frozen and stays in eval mode: `train(True)` is ignored, because dropout or
    masking in train mode would corrupt the targets (the official code left MAE/I-JEPA in train mode).

    Attributes:
        name: registry name, e.g. "dinov2-vit-b".
        embed_dim: D, the token width.
        patch_size: input pixels per token side (after resizing to `resolution`).
        resolution: input side after preprocessing.
        layer: block whose output is returned (None = the last block), after the model's final norm.
        source: where the weights came from (hub id, file path or "random-init"), recorded in target caches.
        global_token_kind: "cls" (the family has a CLS token) or "mean" (mean patch token), see `encode`.

    `forward(images)` returns the patch tokens only; `encode(images, global_token=..., attention_layers=...)` also
    returns the global token and attention maps (`EncoderOutput`) without changing the tokens.
    """

    global_token_kind: str = "mean"

    def __init__(
        self,
        name: str,
        embed_dim: int,
        patch_size: int,
        resolution: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        layer: int | None = None,
        source: str = "",
    ) -> None:
        super().__init__()
        if resolution < patch_size:
            raise ValueError(f"{name}: resolution {resolution} is smaller than the patch size {patch_size}")
        self.name = name
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.resolution = int(resolution)
        self.layer = layer
        self.source = source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) of the returned token grid; N = h * w."""
        g = self.resolution // self.patch_size
        return (g, g)

    @property
    def num_tokens(self) -> int:
        h, w = self.token_grid
        return h * w

    def freeze(self) -> Encoder:
        """requires_grad False everywhere and eval mode; called by every constructor."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> Encoder:
        """Always eval mode: a frozen target network must never run dropout, masking or BN updates."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8/[0,1] images (B, 1|3, H, W) -> normalised float32 pixels (B, 3, resolution, resolution)."""
        x = to_unit_rgb(images.to(self.mean.device))
        x = (x - self.mean) / self.std
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        return x

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode(self, pixels: torch.Tensor, attention_layers: tuple[int, ...]) -> EncoderOutput:
        """Tokens, global token and attention maps of preprocessed pixels; this default has no attention maps and
        takes the mean patch token as the global token (global average pooling)."""
        if attention_layers:
            raise ValueError(
                f"encoder {self.name!r} ({type(self).__name__}) has no attention maps: it is not a transformer. "
                "HASTE's attention alignment needs a ViT encoder (e.g. dinov2-vit-b)"
            )
        tokens = self._tokens(pixels)
        return EncoderOutput(tokens, tokens.mean(dim=1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) float32 of uint8 [0,255] or float [0,1] images (B, 1|3, H, W)."""
        tokens = self._tokens(self.preprocess(images))
        return tokens.float()

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, *, global_token: bool = False, attention_layers: Iterable[int] = ()
    ) -> EncoderOutput:
        """Patch tokens and, on request, the global token and attention maps (REG, HASTE) of one forward pass.

        Args:
            images: uint8 [0,255] or float [0,1] images (B, 1|3, H, W).
            global_token: also return the global token (B, D).
            attention_layers: 1-indexed blocks whose attention maps (B, heads, N, N) to return.

        Returns:
            `EncoderOutput` in float32; `tokens` equals `forward(images)`.

        Raises:
            ValueError: attention maps from an encoder that has none, or a layer outside the run blocks.
        """
        out = self._encode(self.preprocess(images), tuple(sorted({int(a) for a in attention_layers})))
        out.tokens = out.tokens.float()
        out.global_token = out.global_token.float() if global_token and out.global_token is not None else None
        out.attentions = {k: v.float() for k, v in out.attentions.items()}
        return out

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, resolution={self.resolution}, patch_size={self.patch_size}, "
            f"token_grid={self.token_grid}, embed_dim={self.embed_dim}, layer={self.layer}, source={self.source!r}"
        )
