"""Feature detectors for generative metrics: the `Detector` protocol, encoder detectors and `make_detector`.

The FID Inception-v3 (`InceptionDetector`) lives in `repa.evaluation.inception`, and where its weights come from
in `repa.evaluation.inception_weights`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from repa import encoders
from repa.encoders.hf import HUB_POSITION_INTERPOLATION, use_hub_position_interpolation
from repa.evaluation.inception import InceptionDetector


@runtime_checkable
class Detector(Protocol):
    """A frozen feature network for sample-quality metrics.

    `features(images)` takes uint8 images (B, 3, H, W) in [0, 255] and returns a dict of float32 (B, ...) arrays on
    the detector's device: always `pool` (the features FID uses); `spatial` and `logits` when the network has them.
    `name` identifies the network and its preprocessing (it keys cached reference statistics). A detector without
    `logits` may say why in an `is_missing_reason` attribute (optional; it goes to the metrics JSON).
    """

    name: str

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


class EncoderDetector:
    """Pooled tokens of a `repa.encoders` encoder as detector features (e.g. FD_DINOv2-style Fréchet distances).

    The mean of the patch tokens: a Fréchet distance in the spirit of FD_DINOv2, not numerically EDM2's, which uses
    the CLS token of DINOv2-L/14 at 224 px with its own resize: that one is `EncoderClsDetector` ("fd_dinov2").

    Args:
        encoder: a name for `repa.encoders.load_encoder` or an Encoder module (uint8 images in, (B, N, D) tokens
            out).
        resolution: input resolution for a named encoder (224 for DINOv2 as in EDM2).
        device: where to run.
        **encoder_kwargs: forwarded to `load_encoder` (e.g. `weights=`, `layer=`).
    """

    def __init__(
        self,
        encoder: str | torch.nn.Module = "dinov2-vit-l",
        resolution: int = 224,
        device: str | torch.device = "cpu",
        **encoder_kwargs,
    ) -> None:
        self.device = torch.device(device)
        if isinstance(encoder, str):
            encoder = encoders.load_encoder(encoder, resolution=resolution, device=self.device, **encoder_kwargs)
        self.encoder = encoder.to(self.device).eval()
        self.name = f"encoder/{getattr(encoder, 'name', type(encoder).__name__)}/{resolution}/mean"
        self.is_missing_reason = f"the Inception Score needs the Inception classifier; detector {self.name} has none"

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"pool": mean patch token (B, D)} of uint8 images (B, 3, H, W)."""
        tokens = self.encoder(images.to(self.device))  # (B, N, D)
        return {"pool": tokens.float().mean(dim=1)}


FD_DINOV2_ENCODER = "dinov2-vit-l"  # EDM2: torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')
FD_DINOV2_RESOLUTION = 224


class EncoderClsDetector:
    """The CLS token of a `repa.encoders` ViT after its final norm, with EDM2's FD_DINOv2 pipeline.

    EDM2 (`calculate_metrics.py`, `DINOv2Detector`, modelled on dgm-eval) feeds uint8 (B, 3, H, W) images to
    torch-hub DINOv2-L/14 as follows, and takes the model's output, the final-norm CLS token (1024-d):

    1. resize to 224x224: "torch" (EDM2's default) `F.interpolate(x.float(), (224, 224), mode="bicubic",
       antialias=True)` on [0, 255] values, not clamped; or "pil" (dgm-eval's exact reference, EDM2's slow option)
       PIL's bicubic `Image.resize` of each uint8 image, giving uint8 again;
    2. x / 255, then (x - ImageNet mean) / ImageNet std;
    3. the network at 224 px, whose 37x37 position table is resampled as the hub model does
       (`repa.encoders.hf.use_hub_position_interpolation`: scale factor (16 + 0.1) / 37, bicubic, no antialias).

    With `encoder="dinov2-vit-l"` and 224 px this is FD_DINOv2 as EDM2 computes it (up to float differences between
    transformers' and the hub's implementations of the same weights); the Fréchet distance itself is the usual one
    on these features (the `fid` entry of the metrics, with this detector's `name` beside it). Other registry ViTs
    with a CLS token work too, each with its own normalisation.

    Args:
        encoder: a registry name for `repa.encoders.load_encoder`, or an `Encoder` with a CLS token
            (`global_token_kind == "cls"`).
        resolution: the side images are resized to (224 in EDM2).
        device: where to run.
        resize: "torch" (EDM2's default) or "pil" (dgm-eval's reference).
        **encoder_kwargs: forwarded to `load_encoder` (e.g. `weights=`).
    """

    def __init__(
        self,
        encoder: str | torch.nn.Module = FD_DINOV2_ENCODER,
        resolution: int = FD_DINOV2_RESOLUTION,
        device: str | torch.device = "cpu",
        resize: str = "torch",
        **encoder_kwargs,
    ) -> None:
        if resize not in ("torch", "pil"):
            raise ValueError(f"resize must be 'torch' or 'pil', got {resize!r}")
        self.device = torch.device(device)
        self.resize = resize
        self.resolution = int(resolution)
        if isinstance(encoder, str):
            encoder = encoders.load_encoder(encoder, resolution=resolution, device=self.device, **encoder_kwargs)
        if getattr(encoder, "global_token_kind", None) != "cls":
            raise ValueError(f"encoder {getattr(encoder, 'name', encoder)!r} has no CLS token: use 'encoder:<name>' "
                             "(mean patch token) for it")  # fmt: skip
        if getattr(encoder, "resolution", self.resolution) != self.resolution:
            raise ValueError(f"the encoder runs at {encoder.resolution} px but the detector resizes to {resolution}")
        family = getattr(encoder, "family", None)
        if family in HUB_POSITION_INTERPOLATION:
            use_hub_position_interpolation(encoder.model, family)
        self.encoder = encoder.to(self.device).eval()
        name = getattr(encoder, "name", type(encoder).__name__)
        self.name = f"encoder-cls/{name}/{self.resolution}/edm2-{resize}"
        self.is_missing_reason = f"the Inception Score needs the Inception classifier; detector {self.name} has none"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float [0, 1] (B, 3, resolution, resolution), resized as EDM2 (before mean/std)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        size = (self.resolution, self.resolution)
        if self.resize == "pil":
            arrays = images.permute(0, 2, 3, 1).cpu().numpy()
            resized = np.stack([np.asarray(Image.fromarray(a, "RGB").resize(size, Image.Resampling.BICUBIC))
                                for a in arrays])  # fmt: skip
            x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device, torch.float32)
        else:
            x = torch.nn.functional.interpolate(images.to(self.device, torch.float32), size=size, mode="bicubic",
                                                antialias=True)  # fmt: skip
        return x / 255  # the encoder then normalises with its own mean/std (ImageNet's for DINOv2)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"pool": the CLS token after the final norm (B, D)} of uint8 images (B, 3, H, W)."""
        out = self.encoder.encode(self.preprocess(images), global_token=True)
        return {"pool": out.global_token.float()}


def make_detector(
    name: str = "inception",
    device: str | torch.device = "cpu",
    inception: str | Path | None = None,
    classifier: str | None = "auto",
    resolution: int = 224,
) -> Detector:
    """A detector by name: "inception" (the FID network), "encoder:<registry name>" (mean patch tokens),
    "fd_dinov2" / "fd_dinov2-pil" (EDM2's FD_DINOv2: DINOv2-L/14 CLS token at 224 px, torch or PIL bicubic resize)
    or "encoder-cls:<registry name>" (the CLS token with EDM2's pipeline, at `resolution`).

    Args:
        name: "inception", e.g. "encoder:dinov2-vit-l" (`EncoderDetector`), "fd_dinov2" or e.g.
            "encoder-cls:dinov2-vit-b" (`EncoderClsDetector`).
        device: where it runs.
        inception: explicit TorchScript archive (None = the verified default, fetched on first use).
        classifier: Inception softmax matrix source ("auto", a file, or None for no Inception Score); encoder
            detectors have none.
        resolution: input side for encoder detectors.
    """
    if name == "inception":
        return InceptionDetector(inception, classifier=classifier, device=device)
    if name.startswith("encoder:"):
        return EncoderDetector(name.split(":", 1)[1], resolution=resolution, device=device)
    if name in ("fd_dinov2", "fd_dinov2-pil"):
        resize = "pil" if name.endswith("-pil") else "torch"
        return EncoderClsDetector(FD_DINOV2_ENCODER, FD_DINOV2_RESOLUTION, device=device, resize=resize)
    if name.startswith("encoder-cls:"):
        return EncoderClsDetector(name.split(":", 1)[1], resolution=resolution, device=device)
    raise ValueError(f"unknown detector {name!r}: use 'inception', 'encoder:<encoder name>', 'fd_dinov2' "
                     "(EDM2's FD_DINOv2) or 'encoder-cls:<encoder name>'")  # fmt: skip
