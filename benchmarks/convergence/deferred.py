"""Deferred FID: a run without the Inception network (the offline GPU bundle) saves each evaluation's FID samples;
`pack` gathers them with the evaluation rows into a few files that a GPU machine can return (at most 8 files of at
most 16 MiB), and `score` computes the FIDs on another machine and writes the report a scoring run writes.

The samples are the uint8 images the run would have fed to the Inception network, and `score` feeds them in the same
batches through the same code (`evaluate.sample_fid`), so a deferred FID equals the one scored during the run on the
scoring machine (the test checks this bit for bit).

Files of a pack (`<out>/deferred/`):

- `deferred.json`: what was run (preset, arms, alignment blocks, the REPA arm's resolved config, the command, the
  run's wall time, the bundle's FID-reference fingerprint) and every finished evaluation row (`fid` null), with the
  pack file and key of its samples.
- `samples-<arm>-seed<s>[-<k>].npz`: per evaluated step `step_<8 digits>` uint8 (N, C, H, W) and
  `step_<8 digits>_labels` uint8; compressed, at most `PACK_BYTES` of raw samples per file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.convergence import evaluate
from benchmarks.convergence.presets import Preset, preset_from_dict, preset_name
from benchmarks.convergence.report import write_results
from repa.config import Config, from_dict, to_dict
from repa.data.sources import fashion_mnist_images
from repa.fileio import atomic_file, write_json

DESCRIPTION = "deferred.json"
PACK_DIR = "deferred"
PACK_BYTES = 15 * 2**20  # raw sample bytes per pack file: under the device's 16 MiB per returned file uncompressed
MAX_FILES = 8  # the device returns at most 8 files (the script adds its log)
VERSION = 1


def reference_fingerprint(num: int, root: str | None) -> str:
    """SHA-256 of the FID reference images (the first `num // 10` test images of each class under `root`): the
    bundle records it and `score` checks that it scores against the same images."""
    images, _ = fashion_mnist_images("test", num, root)
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()


def write_description(out: Path, *, preset: Preset, arms: list[str], layers: tuple[int, ...], base_depth: int,
                      depths: dict[str, int], command: str, config: Config, wall_s: float | None) -> None:  # fmt: skip
    """`<out>/deferred.json` before the runs start (so an interrupted run can still be packed)."""
    old = out / DESCRIPTION
    extra = {}
    if old.is_file():  # a resumed run keeps what `run_from_bundle` recorded
        extra = {k: v for k, v in json.loads(old.read_text()).items() if k in ("bundle",)}
    write_json({
        "version": VERSION, "preset_name": preset_name(preset), "preset": dataclasses.asdict(preset), "arms": arms,
        "layers": list(layers), "base_depth": base_depth, "depths": depths, "command": command,
        "config": to_dict(config), "wall_s": wall_s, "started": time.time(), **extra,
    }, old, indent=1)  # fmt: skip


def note(out: Path, **values: Any) -> None:
    """Add keys to `<out>/deferred.json` (e.g. the bundle's fingerprints)."""
    path = out / DESCRIPTION
    desc = json.loads(path.read_text()) if path.is_file() else {}
    write_json({**desc, **values}, path, indent=1)


def finish_description(out: Path, wall_s: float) -> dict[str, Any]:
    """Record the finished run's wall time; returns the description."""
    desc = json.loads((out / DESCRIPTION).read_text())
    desc["wall_s"] = wall_s
    write_json(desc, out / DESCRIPTION, indent=1)
    print(f"[convergence] FID deferred: samples of every evaluation saved ({wall_s / 60:.1f} min); finish with "
          f"`python -m benchmarks.convergence --score-samples {out / PACK_DIR}`", flush=True)  # fmt: skip
    return desc


def _finished_evaluations(out: Path) -> list[tuple[dict[str, Any], Path]]:
    """(row, samples file) of every evaluation with both files, in (run folder, step) order."""
    found = []
    for run_dir in sorted(p for p in (out / "runs").glob("*") if p.is_dir()):
        for ev in sorted((run_dir / "evals").glob("step_*.json")):
            samples = run_dir / "fid-samples" / f"{ev.stem}.npz"
            if samples.is_file():
                found.append((json.loads(ev.read_text()), samples))
    return found


def pack(out: Path, dest: Path | None = None) -> list[Path]:
    """Gather the finished evaluations of the deferred run in `out` into `dest` (default `<out>/deferred`):
    `deferred.json` and the sample packs. Safe to call on an interrupted run (it packs what is finished).

    Returns:
        The written files, `deferred.json` first.
    """
    dest = dest or out / PACK_DIR
    desc_path = out / DESCRIPTION
    if not desc_path.is_file():
        raise FileNotFoundError(f"{desc_path} does not exist: {out} holds no deferred run")
    desc = json.loads(desc_path.read_text())
    if desc.get("wall_s") is None:  # interrupted or still running: the time so far
        desc["wall_s"] = time.time() - desc["started"]
        desc["unfinished"] = True
    arms, seeds = desc["arms"], desc["preset"]["seeds"]
    groups: dict[tuple[str, int], list[tuple[dict[str, Any], Path]]] = {}
    for row, samples in _finished_evaluations(out):
        if row["arm"] in arms and row["seed"] in seeds:  # this invocation's runs (a folder may hold more)
            groups.setdefault((row["arm"], row["seed"]), []).append((row, samples))
    dest.mkdir(parents=True, exist_ok=True)
    previous: dict[str, list[str]] = {}  # pack file -> its keys, as the last pack wrote them (kept if unchanged)
    if (dest / DESCRIPTION).is_file():
        for r in json.loads((dest / DESCRIPTION).read_text()).get("rows", []):
            previous.setdefault(r["samples"][0], []).append(r["samples"][1])
    rows, files = [], []
    for (arm, seed), items in sorted(groups.items(), key=lambda kv: (arms.index(kv[0][0]), kv[0][1])):
        chunks: list[list[tuple[dict[str, Any], dict[str, np.ndarray]]]] = [[]]
        size = 0
        for row, samples in sorted(items, key=lambda it: it[0]["step"]):
            with np.load(samples) as z:
                arrays = {"images": z["images"], "labels": z["labels"].astype(np.uint8)}
            n = sum(a.nbytes for a in arrays.values())
            if chunks[-1] and size + n > PACK_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append((row, arrays))
            size += n
        for k, chunk in enumerate(chunks):
            name = f"samples-{arm}-seed{seed}{f'-{k}' if len(chunks) > 1 else ''}.npz"
            content = {}
            for row, arrays in chunk:
                key = f"step_{row['step']:08d}"
                content[key], content[f"{key}_labels"] = arrays["images"], arrays["labels"]
                rows.append({**row, "samples": [name, key]})
            keys = [k for k in content if not k.endswith("_labels")]
            if previous.get(name) != keys or not (dest / name).is_file():
                with atomic_file(dest / name) as f:
                    np.savez_compressed(f, **content)
            files.append(dest / name)
    for stale in set(dest.glob("samples-*.npz")) - set(files):
        stale.unlink()
    write_json({**desc, "rows": rows}, dest / DESCRIPTION, indent=1)
    sizes = [f.stat().st_size for f in files]
    print(f"[convergence] packed {len(rows)} evaluations into {dest}: {DESCRIPTION} + {len(files)} sample file(s), "
          f"{sum(sizes) / 2**20:.1f} MiB (largest {max(sizes, default=0) / 2**20:.1f} MiB)", flush=True)  # fmt: skip
    if len(files) + 2 > MAX_FILES or max(sizes, default=0) > 16 * 2**20:
        print(f"[convergence] WARNING: a device run returns at most {MAX_FILES} files of 16 MiB (with its log); "
              "this pack does not fit", flush=True)  # fmt: skip
    return [dest / DESCRIPTION, *files]


def score(src: Path, out: Path, data_root: str | None = None, device: str | None = None, threads: int | None = None,
          command: str = "") -> dict[str, Any]:  # fmt: skip
    """FID of every packed evaluation in `src` (a `pack` folder), then the report of `write_results` in `out`.

    Args:
        src: the folder with `deferred.json` and the sample packs (e.g. the files a GPU run returned).
        out: where the report goes; per-evaluation FIDs are kept in `<out>/fid/` so a rerun resumes.
        data_root: the Fashion-MNIST folder of the FID reference images (e.g. the bundle's `fashion-mnist/`);
            they must be the images the bundle recorded (checked by fingerprint).
        device: the Inception network's device (default: CUDA if present, else CPU).
        threads: torch threads (default: torch's).

    Returns:
        The summary (also `<out>/summary.json`).
    """
    desc = json.loads((src / DESCRIPTION).read_text())
    if desc.get("version") != VERSION or "rows" not in desc:
        raise ValueError(f"{src / DESCRIPTION} is not a packed deferred run (write it with a --from-bundle run)")
    p = preset_from_dict(desc["preset"])
    want = desc.get("bundle", {}).get("fid_reference_sha256")
    if want and reference_fingerprint(p.fid_reference, data_root) != want:
        raise ValueError(f"the FID reference images ({p.fid_reference} test images under {data_root or 'the default search'}) "
                         "differ from the bundle's: pass --from-bundle BUNDLE or --data-root of the same data")  # fmt: skip
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        detector = evaluate.make_detector(dev)
        ref = evaluate.fid_reference(detector, p.fid_reference, data_root)
        mu, sigma = ref.stats["pool"]
        out.mkdir(parents=True, exist_ok=True)
        rows, t0 = [], time.perf_counter()
        for i, packed in enumerate(desc["rows"]):
            row = {k: v for k, v in packed.items() if k != "samples"}
            cached = out / "fid" / f"{row['arm']}-seed{row['seed']}-step{row['step']:08d}.json"
            if cached.is_file():
                row["fid"] = json.loads(cached.read_text())["fid"]
            else:
                name, key = packed["samples"]
                with np.load(src / name) as z:
                    images = torch.from_numpy(z[key])
                row["fid"] = evaluate.sample_fid(detector, images.split(p.eval_batch), len(images), mu, sigma)
                write_json({"fid": row["fid"], "samples": packed["samples"]}, cached, indent=1)
                print(f"[convergence] scored {i + 1}/{len(desc['rows'])}: {row['arm']} seed {row['seed']} step "
                      f"{row['step']}: FID {row['fid']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            rows.append(row)
    finally:
        torch.set_num_threads(saved)
    if desc.get("unfinished"):
        print("[convergence] note: the deferred run did not finish; the report covers its finished evaluations",
              flush=True)  # fmt: skip
    cmd = " ; ".join(c for c in (desc["command"], command) if c)
    meta = {"preset": p, "layers": tuple(desc["layers"]), "base_depth": desc["base_depth"], "depths": desc["depths"],
            "command": cmd, "wall_s": desc["wall_s"], "config": from_dict(desc["config"])}  # fmt: skip
    return write_results(rows, desc["arms"], out, meta)
