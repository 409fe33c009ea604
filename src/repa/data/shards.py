"""Latent shards: an image folder as VAE posterior moments + encoder targets. The format and the `LatentShards`
reader; the writer primitives are in `repa.data.shard_writer`, the pipeline that fills a folder is
`repa.data.prepare.prepare_shards` (`repa prepare`).

Layout of an output folder:

    prepare.json                        the plan: config + source fingerprint (a rerun must match it)
    latents-00000.safetensors           mean, std (K, F, C, h, w); labels, file_index (K,) int64
    targets-<encoder>-00000.safetensors tokens (K, F, N, D) and global_tokens (K, F, D), one file per encoder
    images-00000.safetensors            images (K, 3, R, R) uint8 centre crops (only with `images=True`)
    shard-00000.json                    completion record: item count, skipped files, sha256 of each file
    manifest.json                       written last, by rank 0: counts, classes, per-shard sha256, config

Shard s covers source files [s * K, (s + 1) * K) of the sorted file list (corrupt files skipped with
`on_error="skip"` are left out and listed), so the content never depends on the number of processes. F is 2
with `flip` (index 0: the image, 1: its mirror image; the latent and the targets of the MIRRORED image, not a
mirrored latent) and 1 otherwise. Latent moments are float32 by default (float16 halves the size; both are
read back as float32); targets are float16 by default (see `repa.data.features`). `global_tokens`, the encoder's
global token (REG's class token), is there when the manifest's encoder entry says `global_token: true` (earlier
preparations have none: they serve plain REPA; REG asks for a new preparation). Every file is written to a
temporary name and renamed; a shard counts as done when its `shard-*.json` exists, so a rerun skips it.

The moments are those of the raw VAE latents z; training reads x = (z - shift) * scale with the manifest's
`latent_norm` (`repa.data.vae.LatentNorm`: the VAE config's scale / shift / per-channel values, or per-channel
statistics measured over these latents with `--latent-norm dataset`). Manifests without `latent_norm` (earlier
versions) mean x = z * config.latent_scale.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repa.assets import sha256_file
from repa.data.vae import LatentNorm, sample_latents
from repa.errors import ReportedError

FORMAT = "repa-latent-shards"
VERSION = 1
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # what latents and targets are stored as
_ST = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64, "BF16": torch.bfloat16, "U8": torch.uint8}


class ShardError(ReportedError, ValueError):
    """A shard file is missing, truncated, or its tensors disagree with the manifest; the message names it."""

    exit_code = 6


# ------------------------------------------------------------------------------------------------------ reading


def manifest_latent_norm(manifest: dict[str, Any]) -> LatentNorm:
    """The normalisation training applies to a manifest's latents: its `latent_norm`, else (a plan's config or an
    earlier manifest) the config's `latent_norm` entry or its plain `latent_scale`."""
    cfg = manifest.get("config", {})
    entry = manifest.get("latent_norm") or cfg.get("latent_norm")
    if entry is not None:
        return LatentNorm.from_json(entry)
    if cfg.get("latent_scale") is None:
        raise ShardError("the manifest records neither a latent_norm nor a latent_scale")
    return LatentNorm(scale=float(cfg["latent_scale"]), source="manifest")


def read_latent_norm(path: str | Path) -> LatentNorm:
    """The latent normalisation of a `repa prepare` folder (or of its `manifest.json`)."""
    path = Path(path)
    path = path / "manifest.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the latent normalisation is recorded in the shards' manifest")
    try:
        return manifest_latent_norm(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as err:
        raise ShardError(f"{path}: {err}") from err


def _map_safetensors(path: Path, expect: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Memory-map the tensors of a safetensors file (no copy, no file descriptor kept), checking names/shapes."""
    if not path.is_file():
        raise ShardError(f"shard file {path} is missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise ShardError(f"shard file {path} is not a readable safetensors file: {err}") from err
    header.pop("__metadata__", None)
    if set(header) != set(expect):
        raise ShardError(f"shard file {path} holds tensors {sorted(header)}, expected {sorted(expect)}")
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    out = {}
    for name, (shape, dtype) in expect.items():
        info = header[name]
        got_dtype, got_shape = _ST.get(info["dtype"]), tuple(info["shape"])
        if got_shape != tuple(shape) or got_dtype != dtype:
            raise ShardError(
                f"shard file {path}: tensor '{name}' has shape {got_shape} {info['dtype']}, the manifest says "
                f"{tuple(shape)} {dtype}; the shard is damaged or from another preparation (rerun `repa prepare`)"
            )
        start, end = (8 + n + o for o in info["data_offsets"])
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end > size or end - start != itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ShardError(f"shard file {path} is truncated ({size} bytes, tensor '{name}' ends at {end})")
        if start % itemsize:
            raise ShardError(f"shard file {path}: tensor '{name}' is not aligned; rewrite it with `repa prepare`")
        out[name] = torch.empty(0, dtype=dtype).set_(storage, start // itemsize, shape)
    return out


class LatentShards:
    """Read-only view of a folder written by `repa prepare`: memory-mapped shards, validated against the manifest.

    Args:
        root: the output folder of `repa prepare` (holding manifest.json).
        verify: also check every file's sha256 against the manifest (reads everything once).

    Attributes:
        num_items, num_classes, classes, sample_shape (C, r/8, r/8), flips, latent_norm (the normalisation
        `batch` applies and decoding inverts), scale (its scalar scale, None when it has a shift or per-channel
        values), encoders (manifest entries), labels (N,) int64, manifest.
    """

    def __init__(self, root: str | Path, *, verify: bool = False) -> None:
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            hint = (
                " (preparation unfinished: rerun the same `repa prepare`)"
                if (self.root / "prepare.json").is_file()
                else ""
            )
            raise FileNotFoundError(f"{path} not found{hint}; create latent shards with `repa prepare SRC {self.root}`")
        m = json.loads(path.read_text(encoding="utf-8"))
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ShardError(f"{path} is not a {FORMAT} v{VERSION} manifest")
        self.manifest, cfg = m, m["config"]
        self.classes: list[str] = m["classes"]
        self.num_classes: int = m["num_classes"]
        self.sample_shape: tuple[int, int, int] = tuple(m["sample_shape"])  # type: ignore[assignment]
        self.flips: tuple[bool, ...] = tuple(cfg["flips"])
        try:
            self.latent_norm: LatentNorm = manifest_latent_norm(m)
            self.latent_norm.check_channels(self.sample_shape[0], str(path))
        except ValueError as err:
            raise ShardError(f"{path}: {err}") from err
        self.scale: float | None = self.latent_norm.scalar_scale
        self.encoders: list[dict[str, Any]] = cfg["encoders"]
        self.has_images: bool = bool(cfg.get("images"))
        self.name = f"latents:{self.root}"
        ldt, tdt = STORAGE_DTYPES[cfg["latent_dtype"]], STORAGE_DTYPES[cfg["target_dtype"]]
        f, r = len(self.flips), cfg["resolution"]
        self._latents, self._tokens, self._images, counts = [], [], [], []
        self._globals: list[list[torch.Tensor | None]] = []  # per shard, per encoder: (K, F, D) or None
        self.class_token = False  # REG: `batch` puts encoder 0's global token in front of its targets
        for shard in m["shards"]:
            n = shard["num_items"]
            lat = {"mean": ((n, f, *self.sample_shape), ldt), "std": ((n, f, *self.sample_shape), ldt),
                   "labels": ((n,), torch.int64), "file_index": ((n,), torch.int64)}  # fmt: skip
            files = shard["files"]
            if verify:
                for entry in files.values():
                    if sha256_file(self.root / entry["path"]) != entry["sha256"]:
                        raise ShardError(f"shard file {self.root / entry['path']}: sha256 differs from the manifest")
            self._latents.append(_map_safetensors(self.root / files["latents"]["path"], lat))
            stored = [
                _map_safetensors(self.root / files[f"targets/{e['name']}"]["path"],
                                 {"tokens": ((n, f, e["num_tokens"], e["embed_dim"]), tdt),
                                  **({"global_tokens": ((n, f, e["embed_dim"]), tdt)} if e.get("global_token") else {})})
                for e in self.encoders
            ]  # fmt: skip
            self._tokens.append([t["tokens"] for t in stored])
            self._globals.append([t.get("global_tokens") for t in stored])
            if self.has_images:
                crops = {"images": ((n, 3, r, r), torch.uint8)}
                self._images.append(_map_safetensors(self.root / files["images"]["path"], crops)["images"])
            counts.append(n)
        self.offsets = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.long)
        self.labels = torch.cat([lat["labels"] for lat in self._latents]).clone() if counts else torch.zeros(0).long()
        if len(self.labels) != m["num_items"]:
            raise ShardError(f"{path}: num_items {m['num_items']} but the shards hold {len(self.labels)} items")

    @property
    def num_items(self) -> int:
        return int(self.offsets[-1])

    # the training-data protocol (`repa.training.data.TrainingData`): x is a fresh posterior sample each step,
    # decoded through the VAE the shards were prepared with; encoder targets are stored beside the latents
    needs_posterior = True
    stores_targets = True

    @property
    def vae(self) -> str:
        return self.manifest["config"]["vae"]

    @property
    def target_specs(self) -> list[tuple[str, int, tuple[int, int]]]:
        """(name, embed_dim, token_grid) of each stored encoder target."""
        return [(e["name"], int(e["embed_dim"]), tuple(e["token_grid"])) for e in self.encoders]

    def __len__(self) -> int:
        return self.num_items

    @property
    def has_flips(self) -> bool:
        """Whether the latents and targets of mirrored images were stored (`repa prepare --flip`)."""
        return len(self.flips) > 1

    @property
    def encoder_names(self) -> list[str]:
        return [e["name"] for e in self.encoders]

    def check_encoders(self, names: Sequence[str], resolution: int | None = None, layer: int | None = None) -> None:
        """Raise ValueError unless targets of exactly these encoders (at this resolution and layer) are stored."""
        want = [(n, resolution, layer) for n in names]
        have = [(e["name"], resolution if resolution is None else e["resolution"], e["layer"]) for e in self.encoders]
        if want != have:
            raise ValueError(
                f"{self.root} holds targets of {[(e['name'], e['resolution'], e['layer']) for e in self.encoders]} "
                f"(name, resolution, layer), the run wants {want}; rerun `repa prepare` with --encoders "
                f"{' '.join(names) or 'none'} or change repa.encoders / repa.encoder_resolution / repa.encoder_layer"
            )

    def _locate(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.num_items):
            raise IndexError(f"item indices must be in [0, {self.num_items}), got {idx.min()}..{idx.max()}")
        shard = torch.searchsorted(self.offsets[1:], idx, right=True)
        return shard, idx - self.offsets[shard]

    def _gather(self, tensors: Sequence[torch.Tensor], idx: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        """Items `idx` of per-shard tensors (K_s, F, ...) (version `flips`) -> (B, ...) float32, or of per-shard
        tensors (K_s, ...) with flips=None -> (B, ...) in their dtype."""
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        shard, local = self._locate(idx)
        rest = tensors[0].shape[1 if flips is None else 2 :]
        out = torch.empty((len(idx), *rest), dtype=tensors[0].dtype if flips is None else torch.float32)
        for s in torch.unique(shard).tolist():
            sel = shard == s
            out[sel] = tensors[s][local[sel]] if flips is None else tensors[s][local[sel], flips[sel]].float()
        return out

    def _flip_index(self, flips: torch.Tensor | None, n: int) -> torch.Tensor:
        flips = torch.zeros(n, dtype=torch.bool) if flips is None else torch.as_tensor(flips, dtype=torch.bool).cpu()
        if bool(flips.any()) and not self.has_flips:
            raise ValueError(
                f"{self.root} was prepared without --flip: rerun `repa prepare --flip` or set data.hflip=false"
            )
        return flips.long()

    def moments(self, idx: torch.Tensor, flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std) (B, C, h, w) float32 of items `idx` (of the mirrored image where `flips`)."""
        f = self._flip_index(flips, len(idx))
        return (self._gather([s["mean"] for s in self._latents], idx, f),
                self._gather([s["std"] for s in self._latents], idx, f))  # fmt: skip

    def targets(self, idx: torch.Tensor, flips: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per encoder, the stored tokens (B, N, D) float32 of items `idx` (of the mirrored image where `flips`)."""
        f = self._flip_index(flips, len(idx))
        return [self._gather([s[k] for s in self._tokens], idx, f) for k in range(len(self.encoders))]

    def use_class_token(self) -> None:
        """REG: from now on `batch` puts encoder 0's stored global token in front of its targets, (B, 1 + N, D)
        (REG's target layout, split off by `RepaLoss(class_tokens_in_targets=True)`); raises unless it was stored."""
        if not self.encoders or not self.encoders[0].get("global_token"):
            raise ShardError(f"{self.root} was prepared without the encoder's global token, which REG (repa.class_token) "
                             "needs: rerun `repa prepare` into a new folder")  # fmt: skip
        self.class_token = True

    def global_tokens(self, idx: torch.Tensor, flips: torch.Tensor | None = None, encoder: int = 0) -> torch.Tensor:
        """The stored global tokens (B, D) float32 of encoder `encoder` for items `idx` (mirrored where `flips`)."""
        if self.encoders and not self.encoders[encoder].get("global_token"):
            raise ShardError(f"{self.root}: no global tokens stored for {self.encoders[encoder]['name']}")
        return self._gather([s[encoder] for s in self._globals], idx, self._flip_index(flips, len(idx)))  # type: ignore[misc]

    def images(self, idx: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
        """The stored centre crops uint8 (B, 3, R, R) of items `idx`, mirrored where `flips` (`repa prepare --images`)."""
        if not self.has_images:
            raise ValueError(f"{self.root} holds no images: rerun `repa prepare --images` to run encoders online")
        crops = self._gather(self._images, idx, None)
        if flips is not None and bool(torch.as_tensor(flips).any()):
            crops = torch.where(
                torch.as_tensor(flips, dtype=torch.bool).cpu()[:, None, None, None], crops.flip(-1), crops
            )
        return crops

    def batch(
        self,
        idx: torch.Tensor,
        flips: torch.Tensor,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        *,
        eps: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """A training batch: x = (mean + std * eps - shift) * scale, a fresh posterior sample (REPA/DiT recipe)
        normalised with `latent_norm` (SD-VAE: (mean + std * eps) * 0.18215).

        Args:
            idx: (B,) item indices.
            flips: (B,) bool; True takes the stored latent/targets of the mirrored image.
            device: where the outputs go.
            generator: RNG of eps ~ N(0, I) (B, C, h, w), drawn on the generator's device (global CPU RNG if None).
            eps: the standard normal draw itself (B, C, h, w), instead of `generator` (e.g. a slice of a global
                draw, so that N processes see the same numbers as one).

        Returns:
            dict(x=(B, C, h, w) float32, y=(B,) int64, targets=[(B, N, D) float32 per encoder], images=uint8
            (B, 3, R, R)) on `device`; `targets` only when encoders were stored, `images` only with `--images`.
        """
        mean, std = self.moments(idx, flips)
        if eps is None:
            g_dev = generator.device if generator is not None else torch.device("cpu")
            x = sample_latents(mean.to(g_dev), std.to(g_dev), generator, self.latent_norm).to(device)
        else:
            if tuple(eps.shape) != tuple(mean.shape):
                raise ValueError(f"eps must have shape {tuple(mean.shape)}, got {tuple(eps.shape)}")
            z = mean.to(device) + std.to(device) * eps.to(device=device, dtype=torch.float32)
            x = self.latent_norm.normalize(z)
        return {"x": x, **self.items(idx, flips, device)}

    def items(self, idx: torch.Tensor, flips: torch.Tensor, device: torch.device | str) -> dict[str, Any]:
        """What `batch` returns besides x: y, and `targets` / `images` where stored (REPA-E encodes the images
        itself and needs no stored latent)."""
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        out: dict[str, Any] = {"y": self.labels[idx].to(device)}
        if self.encoders:
            out["targets"] = [t.to(device) for t in self.targets(idx, flips)]
            if self.class_token:  # REG's target layout: encoder 0's global token first
                cls = self.global_tokens(idx, flips).to(device)
                out["targets"][0] = torch.cat([cls[:, None], out["targets"][0]], dim=1)
        if self.has_images:
            out["images"] = self.images(idx, flips).to(device)
        return out
