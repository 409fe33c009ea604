"""Writer primitives of latent shards (the format is in `repa.data.shards`): file names, plan, shard, manifest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from repa.data.shards import FORMAT, STORAGE_DTYPES, VERSION, ShardError
from repa.data.vae import LatentNorm
from repa.fileio import atomic_file, write_json

LATENT_NORMS = ("vae", "dataset")  # `repa prepare --latent-norm`


def to_storage(x: torch.Tensor, dtype: str, what: str) -> torch.Tensor:
    """Cast to the storage dtype ("float32" / "float16"); float16 refuses values outside its range."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"shards store float32 or float16, got {dtype!r}")
    if dtype == "float16" and x.numel() and not bool(x.abs().max() < 65000):
        raise ValueError(f"{what} exceed the float16 range; store them as float32")
    return x.to(STORAGE_DTYPES[dtype])


def latents_file(shard: int) -> str:
    return f"latents-{shard:05d}.safetensors"


def targets_file(encoder: str, shard: int) -> str:
    return f"targets-{encoder.replace('/', '_')}-{shard:05d}.safetensors"


def images_file(shard: int) -> str:
    return f"images-{shard:05d}.safetensors"


def record_file(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
    """safetensors written whole or not at all (`atomic_file`); returns {path, sha256, bytes} of the final file."""
    # one metadata key: safetensors orders several keys arbitrarily, and the bytes must be reproducible
    data = save({k: v.contiguous() for k, v in tensors.items()}, {"repa": json.dumps(metadata, sort_keys=True)})
    with atomic_file(path) as f:
        f.write(data)
    return {"path": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def encoder_entry(encoder: nn.Module) -> dict[str, Any]:
    """What the manifest records about one target encoder (a `repa.encoders.Encoder`); `global_token: true` when
    its global token (REG's class token) is stored beside the patch tokens (absent in earlier manifests: none)."""
    grid = [int(g) for g in encoder.token_grid]
    entry = {
        "name": encoder.name,
        "source": getattr(encoder, "source", ""),
        "resolution": int(encoder.resolution),
        "layer": getattr(encoder, "layer", None),
        "token_grid": grid,
        "num_tokens": grid[0] * grid[1],
        "embed_dim": int(encoder.embed_dim),
    }
    if callable(getattr(encoder, "encode", None)):
        entry["global_token"] = True
    return entry


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
    latent_norm: str = "vae",
) -> dict[str, Any]:
    """The `config` entry of the plan and the manifest: what the stored numbers mean.

    `latent_scale` is the scalar scale of a plain `x = z * scale` normalisation (SD-VAE: 0.18215) and None
    otherwise; `latent_norm` is added only when there is more to say: the VAE config's shift or per-channel values
    (`latent_norm="vae"`), or {"source": "dataset"} (measured when the manifest is written). So preparations of a
    plain-scale VAE keep the plan (and resume) of earlier versions."""
    if latent_norm not in LATENT_NORMS:
        raise ValueError(f"latent_norm must be one of {LATENT_NORMS}, got {latent_norm!r}")
    down = int(vae.downsample)
    if resolution % down:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE downsampling factor {down}")
    for dt in (latent_dtype, target_dtype):
        if dt not in STORAGE_DTYPES:
            raise ValueError(f"shards store float32 or float16, got {dt!r}")
    names = [e.name for e in encoders]
    if len(set(names)) != len(names):
        raise ValueError(f"encoders must be distinct, got {names}")
    norm = vae.norm if isinstance(getattr(vae, "norm", None), LatentNorm) else LatentNorm(scale=float(vae.scale))
    norm.check_channels(int(vae.latent_channels), f"the VAE {getattr(vae, 'source', '')}")
    scale = norm.scalar_scale if latent_norm == "vae" else None
    config = {
        "resolution": resolution, "vae": getattr(vae, "source", ""), "latent_scale": scale,
        "vae_downsample": down, "latent_shape": [int(vae.latent_channels), resolution // down, resolution // down],
        "latent_dtype": latent_dtype, "target_dtype": target_dtype,
        "flips": [False, True] if flip else [False], "encoders": [encoder_entry(e) for e in encoders],
        "images": bool(images),
    }  # fmt: skip
    if latent_norm == "dataset":
        config["latent_norm"] = {"source": "dataset"}
    elif scale is None:
        config["latent_norm"] = norm.to_json()
    return config


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
    f, ldt, tdt = len(cfg["flips"]), STORAGE_DTYPES[cfg["latent_dtype"]], STORAGE_DTYPES[cfg["target_dtype"]]

    def cat(get: Callable[[dict[str, Any]], torch.Tensor], empty: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([get(p) for p in parts]) if parts else torch.zeros(empty, dtype=dtype)

    meta = {"format": FORMAT, "shard": shard}
    files = {}
    for k, enc in enumerate(cfg["encoders"]):
        stored = {"tokens": cat(lambda p, k=k: p["tokens"][k], (0, f, enc["num_tokens"], enc["embed_dim"]), tdt)}
        if enc.get("global_token"):  # REG's class token, beside the patch tokens
            stored["global_tokens"] = cat(lambda p, k=k: p["global_tokens"][k], (0, f, enc["embed_dim"]), tdt)
        path = out / targets_file(enc["name"], shard)
        files[f"targets/{enc['name']}"] = _save_atomic(path, stored, {**meta, "kind": "targets"})
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
    write_json(record, out / record_file(shard), indent=1)  # last: the shard now counts as done
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
    entry = cfg.get("latent_norm")
    if entry is not None and entry.get("source") == "dataset":
        norm = dataset_latent_norm(out, plan, records)
    elif entry is not None:
        norm = LatentNorm.from_json(entry).to_json()
    else:  # a plain scale (SD-VAE: 0.18215), from the VAE's config
        norm = LatentNorm(scale=cfg["latent_scale"], source="vae").to_json()
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
        "latent_norm": norm,
        "config": cfg,
        "source": plan["source"],
        "shards": [{k: r[k] for k in ("index", "num_items", "first_file", "files")} for r in records],
    }
    write_json(manifest, out / "manifest.json", indent=1)
    return manifest


def dataset_latent_norm(out: Path, plan: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-channel mean and std of the latents the diffusion model is trained on, over every stored item and flip,
    and the normalisation x = (z - mean) / std they give (the manifest's `latent_norm`, `source="dataset"`).

    The statistics are those of the posterior samples z = mean + std * eps that training draws, computed exactly
    from the stored moments (E[z] = E[mean], Var[z] = Var[mean] + E[std^2], all in float64), which is what REPA-E's
    BatchNorm over sampled latents estimates; shard after shard in order, so the numbers do not depend on the
    number of processes that prepared the shards."""
    c = plan["config"]["latent_shape"][0]
    s1, s2, var = (torch.zeros(c, dtype=torch.float64) for _ in range(3))
    count = 0
    for rec in records:
        path = out / rec["files"]["latents"]["path"]
        with safe_open(str(path), framework="pt") as f:
            mean, std = f.get_tensor("mean").double(), f.get_tensor("std").double()
        dims = [d for d in range(mean.ndim) if d != 2]  # (K, F, C, h, w): all but the channels
        s1 += mean.sum(dims)
        s2 += (mean * mean).sum(dims)
        var += (std * std).sum(dims)
        count += mean.numel() // c
    if count == 0:
        raise ShardError(f"{out}: no latents to measure per-channel statistics on (every image was skipped)")
    mu = s1 / count
    sigma = (s2 / count - mu * mu + var / count).clamp_min(0).sqrt()
    if not bool(torch.isfinite(sigma).all() & (sigma > 0).all()):
        raise ShardError(f"{out}: per-channel latent std {sigma.tolist()} is not positive and finite; "
                         "use --latent-norm vae")  # fmt: skip
    norm = LatentNorm.from_statistics(mu.tolist(), sigma.tolist())
    return {**norm.to_json(), "mean": mu.tolist(), "std": sigma.tolist(), "num_values": count,
            "over": "posterior samples z = mean + std * eps of every stored item and flip"}  # fmt: skip


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
        (out / "manifest.json").unlink(missing_ok=True)
        write_json(plan, path, indent=1)
    else:
        raise FileNotFoundError(f"{path} is missing after the barrier: is {out} on a file system shared by all ranks?")


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} before, {b!r} now"]
