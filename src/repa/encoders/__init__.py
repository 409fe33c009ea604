"""repa.encoders: frozen target encoders that own their preprocessing and return patch tokens (B, N, D)."""

from repa.encoders.base import Encoder, to_unit_rgb
from repa.encoders.registry import ENCODERS, EncoderSpec, EncoderWeightsError, load_encoder

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderSpec",
    "EncoderWeightsError",
    "load_encoder",
    "to_unit_rgb",
]
