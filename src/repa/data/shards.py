"""Latent shards: an image folder as SD-VAE posterior moments + encoder targets. The format, its writer primitives
and the `LatentShards` reader; the pipeline that fills a folder is `repa.cli.prepare.prepare_shards`.

Layout of an output folder:

    prepare.json                        the plan: config + source fingerprint (a rerun must match it)
    latents-00000.safetensors           mean, std (K, F, C, h, w); labels, file_index (K,) int64
    targets-<encoder>-00000.safetensors tokens (K, F, N, D), one file per encoder
    images-00000.safetensors            images (K, 3, R, R) uint8 centre crops (only with `images=True`)
    shard-00000.json                    completion record: item count, skipped files, sha256 of each file
    manifest.json                       written last, by rank 0: counts, classes, per-shard sha256, config

Shard s covers source files [s * K, (s + 1) * K) of the sorted file list (corrupt files skipped with
`on_error="skip"` are left out and listed), so the content never depends on the number of processes. F is 2
with `flip` (index 0: the image, 1: its mirror image; the latent and the targets of the MIRRORED image, not a
mirrored latent) and 1 otherwise. Latent moments are float32 by default (float16 halves the size; both are
read back as float32); targets are float16 by default (see `repa.data.features`). Every file is written to a
temporary name and renamed; a shard counts as done when its `shard-*.json` exists, so a rerun skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repa.encoders.assets import sha256_file

FORMAT = "repa-latent-shards"
VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_ST = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64, "BF16": torch.bfloat16, "U8": torch.uint8}


class ShardError(ValueError):
    """A shard file is missing, truncated, or its tensors disagree with the manifest; the message names it."""


def to_storage(x: torch.Tensor, dtype: str, what: str) -> torch.Tensor:
    """Cast to the storage dtype ("float32" / "float16"); float16 refuses values outside its range."""
    if dtype not in _DTYPES:
        raise ValueError(f"shards store float32 or float16, got {dtype!r}")
    if dtype == "float16" and x.numel() and not bool(x.abs().max() < 65000):
        raise ValueError(f"{what} exceed the float16 range; store them as float32")
    return x.to(_DTYPES[dtype])


def latents_file(shard: int) -> str:
    return f"latents-{shard:05d}.safetensors"


def targets_file(encoder: str, shard: int) -> str:
    return f"targets-{encoder.replace('/', '_')}-{shard:05d}.safetensors"


def images_file(shard: int) -> str:
    return f"images-{shard:05d}.safetensors"


def record_file(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
    """safetensors to a temporary file, fsync, rename; returns {path, sha256, bytes} of the final file."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # one metadata key: safetensors orders several keys arbitrarily, and the bytes must be reproducible
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), {"repa": json.dumps(metadata, sort_keys=True)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # plain file permissions (the writer may create it private)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return {"path": path.name, "sha256": digest, "bytes": path.stat().st_size}


def encoder_entry(encoder: nn.Module) -> dict[str, Any]:
    """What the manifest records about one target encoder (a `repa.encoders.Encoder`)."""
    grid = [int(g) for g in encoder.token_grid]
    return {
        "name": encoder.name,
        "source": getattr(encoder, "source", ""),
        "resolution": int(encoder.resolution),
        "layer": getattr(encoder, "layer", None),
        "token_grid": grid,
        "num_tokens": grid[0] * grid[1],
        "embed_dim": int(encoder.embed_dim),
    }


def shard_plan(
    source: Path, samples: list[tuple[Path, int]], classes: list[str], config: dict[str, Any], shard_size: int
) -> dict[str, Any]:
    """The identity of a preparation: a rerun into the same folder must produce the same plan."""
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{path.relative_to(source).as_posix()}\t{label}\n".encode())
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "source": {"num_files": len(samples), "classes": classes, "fingerprint": h.hexdigest()},
        "shard_size": shard_size,
        "num_shards": -(-len(samples) // shard_size),
    }


def run_config(
    vae: nn.Module,
    encoders: Sequence[nn.Module],
    resolution: int,
    flip: bool,
    latent_dtype: str,
    target_dtype: str,
    images: bool = False,
) -> dict[str, Any]:
    """The `config` entry of the plan and the manifest: what the stored numbers mean."""
    down = int(vae.downsample)
    if resolution % down:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE downsampling factor {down}")
    for dt in (latent_dtype, target_dtype):
        if dt not in _DTYPES:
            raise ValueError(f"shards store float32 or float16, got {dt!r}")
    names = [e.name for e in encoders]
    if len(set(names)) != len(names):
        raise ValueError(f"encoders must be distinct, got {names}")
    return {
        "resolution": resolution, "vae": getattr(vae, "source", ""), "latent_scale": float(vae.scale),
        "vae_downsample": down, "latent_shape": [int(vae.latent_channels), resolution // down, resolution // down],
        "latent_dtype": latent_dtype, "target_dtype": target_dtype,
        "flips": [False, True] if flip else [False], "encoders": [encoder_entry(e) for e in encoders],
        "images": bool(images),
    }  # fmt: skip


def plan_hash(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def shard_done(out: Path, shard: int, plan_hash: str) -> bool:
    """True if shard `shard` is complete for this plan (record present, every file there with its size)."""
    rec_path = out / record_file(shard)
    if not rec_path.is_file():
        return False
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if rec.get("plan") != plan_hash:
        return False
    return all(
        (out / f["path"]).is_file() and (out / f["path"]).stat().st_size == f["bytes"] for f in rec["files"].values()
    )


def write_shard(
    out: Path, shard: int, plan: dict[str, Any], parts: list[dict[str, Any]], skipped: list[str]
) -> dict[str, Any]:
    """Write shard `shard` from its encoded batches (dicts of mean, std, tokens, labels, file_index in storage
    dtypes): the target files, the latent file, then the record that marks the shard as done."""
    cfg = plan["config"]
    f, ldt, tdt = len(cfg["flips"]), _DTYPES[cfg["latent_dtype"]], _DTYPES[cfg["target_dtype"]]

    def cat(get: Callable[[dict[str, Any]], torch.Tensor], empty: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([get(p) for p in parts]) if parts else torch.zeros(empty, dtype=dtype)

    meta = {"format": FORMAT, "shard": shard}
    files = {}
    for k, enc in enumerate(cfg["encoders"]):
        tokens = cat(lambda p, k=k: p["tokens"][k], (0, f, enc["num_tokens"], enc["embed_dim"]), tdt)
        path = out / targets_file(enc["name"], shard)
        files[f"targets/{enc['name']}"] = _save_atomic(path, {"tokens": tokens}, {**meta, "kind": "targets"})
    latents = {
        "mean": cat(lambda p: p["mean"], (0, f, *cfg["latent_shape"]), ldt),
        "std": cat(lambda p: p["std"], (0, f, *cfg["latent_shape"]), ldt),
        "labels": cat(lambda p: p["labels"], (0,), torch.int64).long(),
        "file_index": cat(lambda p: p["file_index"], (0,), torch.int64).long(),
    }
    if cfg.get("images"):  # the centre crops themselves (uint8, unflipped), for encoders run during training
        r = cfg["resolution"]
        crops = cat(lambda p: p["images"], (0, 3, r, r), torch.uint8)
        files["images"] = _save_atomic(out / images_file(shard), {"images": crops}, {**meta, "kind": "images"})
    files["latents"] = _save_atomic(out / latents_file(shard), latents, {**meta, "kind": "latents"})
    record = {"index": shard, "num_items": len(latents["labels"]), "first_file": shard * plan["shard_size"],
              "skipped": skipped, "files": files, "plan": plan_hash(plan)}  # fmt: skip
    _write_json(out / record_file(shard), record)  # last: the shard now counts as done
    return record


def write_manifest(out: str | Path) -> dict[str, Any]:
    """Merge the plan and every shard record into `manifest.json` (atomically). Raises if a shard is missing."""
    out = Path(out)
    plan = json.loads((out / "prepare.json").read_text(encoding="utf-8"))
    phash = plan_hash(plan)
    missing = [s for s in range(plan["num_shards"]) if not shard_done(out, s, phash)]
    if missing:
        raise ShardError(f"{out}: shards {missing[:10]} are not complete; rerun `repa prepare` to finish them")
    records = [json.loads((out / record_file(s)).read_text(encoding="utf-8")) for s in range(plan["num_shards"])]
    skipped = [p for r in records for p in r["skipped"]]
    cfg = plan["config"]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_items": sum(r["num_items"] for r in records),
        "num_classes": len(plan["source"]["classes"]),
        "classes": plan["source"]["classes"],
        "sample_shape": cfg["latent_shape"],
        "num_shards": plan["num_shards"],
        "shard_size": plan["shard_size"],
        "skipped": {"count": len(skipped), "files": skipped},
        "config": cfg,
        "source": plan["source"],
        "shards": [{k: r[k] for k in ("index", "num_items", "first_file", "files")} for r in records],
    }
    _write_json(out / "manifest.json", manifest)
    return manifest


def check_plan(out: Path, plan: dict[str, Any], rank: int) -> None:
    """Before the barrier rank 0 writes `prepare.json` or checks an existing one (an earlier, interrupted run);
    after it every other rank checks that it computed the same plan (same files, same settings)."""
    path = out / "prepare.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != plan:
            diff = _diff(old, plan)
            raise ValueError(
                f"{out} holds shards prepared with other settings ({'; '.join(diff[:6])}); "
                "use another output folder or delete this one"
            )
        if rank == 0:  # temporary files of a killed run (nobody writes before the barrier that follows)
            for stale in out.glob(".*.tmp*"):
                stale.unlink(missing_ok=True)
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").unlink(missing_ok=True)
        _write_json(path, plan)
    else:
        raise FileNotFoundError(f"{path} is missing after the barrier: is {out} on a file system shared by all ranks?")


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} before, {b!r} now"]


# ------------------------------------------------------------------------------------------------------ reading


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
        num_items, num_classes, classes, sample_shape (C, r/8, r/8), flips, scale, encoders (manifest entries),
        labels (N,) int64, manifest.
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
        self.scale: float = float(cfg["latent_scale"])
        self.encoders: list[dict[str, Any]] = cfg["encoders"]
        self.has_images: bool = bool(cfg.get("images"))
        self.name = f"latents:{self.root}"
        ldt, tdt, f, r = _DTYPES[cfg["latent_dtype"]], _DTYPES[cfg["target_dtype"]], len(self.flips), cfg["resolution"]
        self._latents, self._tokens, self._images, counts = [], [], [], []
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
            self._tokens.append([
                _map_safetensors(self.root / files[f"targets/{e['name']}"]["path"],
                                 {"tokens": ((n, f, e["num_tokens"], e["embed_dim"]), tdt)})["tokens"]
                for e in self.encoders
            ])  # fmt: skip
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

    def __len__(self) -> int:
        return self.num_items

    @property
    def has_flips(self) -> bool:
        """Whether the latents and targets of mirrored images were stored (`repa prepare --flip`)."""
        return len(self.flips) > 1

    @property
    def encoder_names(self) -> list[str]:
        return [e["name"] for e in self.encoders]

    def fingerprint(self) -> str:
        """Identifies these shards' contents (hash of the per-file sha256 in the manifest)."""
        h = hashlib.sha1()
        for shard in self.manifest["shards"]:
            for key in sorted(shard["files"]):
                h.update(shard["files"][key]["sha256"].encode())
        return h.hexdigest()[:16]

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
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        f = self._flip_index(flips, len(idx))
        return (self._gather([s["mean"] for s in self._latents], idx, f),
                self._gather([s["std"] for s in self._latents], idx, f))  # fmt: skip

    def targets(self, idx: torch.Tensor, flips: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per encoder, the stored tokens (B, N, D) float32 of items `idx` (of the mirrored image where `flips`)."""
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        f = self._flip_index(flips, len(idx))
        return [self._gather([s[k] for s in self._tokens], idx, f) for k in range(len(self.encoders))]

    def images(self, idx: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
        """The stored centre crops uint8 (B, 3, R, R) of items `idx`, mirrored where `flips` (`repa prepare --images`)."""
        if not self.has_images:
            raise ValueError(f"{self.root} holds no images: rerun `repa prepare --images` to run encoders online")
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
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
        """A training batch: x = (mean + std * eps) * scale, a fresh posterior sample (REPA/DiT recipe).

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
        from repa.data.vae import sample_latents

        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        mean, std = self.moments(idx, flips)
        if eps is None:
            g_dev = generator.device if generator is not None else torch.device("cpu")
            x = sample_latents(mean.to(g_dev), std.to(g_dev), generator, self.scale).to(device)
        else:
            if tuple(eps.shape) != tuple(mean.shape):
                raise ValueError(f"eps must have shape {tuple(mean.shape)}, got {tuple(eps.shape)}")
            x = (mean.to(device) + std.to(device) * eps.to(device=device, dtype=torch.float32)) * self.scale
        out: dict[str, Any] = {"x": x, "y": self.labels[idx].to(device)}
        if self.encoders:
            out["targets"] = [t.to(device) for t in self.targets(idx, flips)]
        if self.has_images:
            out["images"] = self.images(idx, flips).to(device)
        return out
