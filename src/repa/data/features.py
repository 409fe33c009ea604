"""Encoder-target cache: each training image's frozen-encoder patch tokens, computed once, stored as safetensors.

File layout: one safetensors tensor `targets` of shape (num_flips, num_images, N, D) (float16 by default: a relative
error ~1e-3, far below anything REPA's cosine loss can see; the loss normalises in float32), beside it
`global_tokens` (num_flips, num_images, D), the encoder's global token (REG's class token: the CLS token, or the mean
patch token for encoders without one, `Encoder.encode`), and a JSON header entry `repa` recording encoder name,
weights source, resolution, layer, token grid, N, D, image count, dataset fingerprint, flips and `global_token`.
Caches written before the global token was stored (no `global_tokens`) still serve plain REPA; REG asks for a
rebuild. The file is written in place into `<path>.partial` (memory-mapped, batch by batch, with a
progress note), so an interrupted build resumes where it stopped; it appears at `path` only when complete
(`os.replace`). Loading memory-maps the tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from repa.errors import ReportedError
from repa.fileio import fsync_file, write_text_atomic

FORMAT_VERSION = 1
_ST_DTYPES = {torch.float16: ("F16", np.float16), torch.float32: ("F32", np.float32)}


class TargetCacheMismatch(ReportedError, ValueError):
    """An existing cache was built for another encoder, resolution, layer, dataset or flip set."""

    exit_code = 9


def images_fingerprint(images: torch.Tensor, *extra: torch.Tensor) -> str:
    """SHA-1 (16 hex) of a uint8 image tensor's shape and bytes, then of the `extra` tensors' bytes (labels):
    identifies the exact image set and order."""
    h = hashlib.sha1(str(tuple(images.shape)).encode())
    for t in (images, *extra):
        h.update(np.ascontiguousarray(t.cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


def _as_nchw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        raise TypeError(f"target caches are built from uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W) or (N, 1|3, H, W), got {tuple(images.shape)}")
    return images


def cache_metadata(encoder: torch.nn.Module, images: torch.Tensor, flips: tuple[bool, ...], dtype: torch.dtype) -> dict:
    """The identity of a cache: what must match for reuse."""
    images = _as_nchw(images)
    return {
        "format": "repa-targets",
        "version": FORMAT_VERSION,
        "encoder": encoder.name,
        "source": getattr(encoder, "source", ""),
        "resolution": encoder.resolution,
        "layer": getattr(encoder, "layer", None),
        "token_grid": list(encoder.token_grid),
        "num_tokens": int(encoder.token_grid[0] * encoder.token_grid[1]),
        "embed_dim": encoder.embed_dim,
        "num_images": len(images),
        "image_shape": list(images.shape[1:]),
        "fingerprint": images_fingerprint(images),
        "flips": [bool(f) for f in flips],
        "dtype": _ST_DTYPES[dtype][0],
    }


def _header(meta: dict, shape: tuple[int, ...], global_shape: tuple[int, ...] | None = None) -> bytes:
    st, np_dtype = next(v for v in _ST_DTYPES.values() if v[0] == meta["dtype"])
    nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
    head = {
        "__metadata__": {"repa": json.dumps(meta)},
        "targets": {"dtype": st, "shape": list(shape), "data_offsets": [0, nbytes]},
    }
    if global_shape is not None:  # right after the patch tokens
        gbytes = int(np.prod(global_shape)) * np.dtype(np_dtype).itemsize
        head["global_tokens"] = {"dtype": st, "shape": list(global_shape), "data_offsets": [nbytes, nbytes + gbytes]}
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _read_header(path: Path) -> tuple[dict, dict, int]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"header length {n} exceeds the file size {size}")
        head = json.loads(f.read(n))
    meta = json.loads(head.pop("__metadata__", {}).get("repa", "{}"))
    return meta, head, 8 + n


def _memmap(path: Path, info: dict, offset: int) -> np.memmap:
    np_dtype = {"F16": np.float16, "F32": np.float32}[info["dtype"]]
    return np.memmap(
        path, dtype=np_dtype, mode="c", offset=offset + info["data_offsets"][0], shape=tuple(info["shape"])
    )


class TargetCache:
    """A built cache: `tensor` (num_flips, num_images, N, D) and `global_tokens` (num_flips, num_images, D) or None
    (a cache written before they were stored), memory-mapped; `meta` its identity."""

    def __init__(
        self, tensor: torch.Tensor, meta: dict, path: Path | None = None, global_tokens: torch.Tensor | None = None
    ) -> None:
        self.tensor, self.meta, self.path, self.global_tokens = tensor, meta, path, global_tokens

    @classmethod
    def load(cls, path: str | Path, expect: dict | None = None) -> TargetCache:
        """Open a cache (memory-mapped). `expect`: metadata entries that must match (else TargetCacheMismatch)."""
        path = Path(path)
        try:  # a truncated or overwritten file names itself (build_target_cache(overwrite=True) rebuilds it)
            meta, head, offset = _read_header(path)
            if meta.get("format") != "repa-targets":
                raise TargetCacheMismatch(f"{path} is not a repa target cache")
            arr = _memmap(path, head["targets"], offset)
            glob = _memmap(path, head["global_tokens"], offset) if "global_tokens" in head else None
        except TargetCacheMismatch:
            raise
        except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise TargetCacheMismatch(
                f"target cache {path} is damaged ({type(e).__name__}: {e}); delete it or rebuild"
            ) from e
        cache = cls(torch.from_numpy(arr), meta, path, None if glob is None else torch.from_numpy(glob))
        if expect is not None:
            cache.check(expect)
        return cache

    def check(self, expect: dict) -> None:
        """Raise TargetCacheMismatch naming every differing metadata entry."""
        diff = {k: (self.meta.get(k), v) for k, v in expect.items() if self.meta.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: cached {a!r} vs wanted {b!r}" for k, (a, b) in diff.items())
            raise TargetCacheMismatch(f"target cache {self.path} does not match ({lines}); delete it or rebuild")

    @property
    def flips(self) -> tuple[bool, ...]:
        return tuple(self.meta["flips"])

    def __len__(self) -> int:
        return self.tensor.shape[1]

    def get(self, index: int | torch.Tensor, flip: bool | torch.Tensor = False) -> torch.Tensor:
        """Targets (N, D) (or (B, N, D) for index tensors) as float32, of the mirrored image where `flip`."""
        flip = torch.as_tensor(flip)
        if bool(flip.any()) and len(self.flips) < 2:
            raise ValueError(f"{self.path}: built without mirrored images; rebuild with flips=(False, True)")
        return self.tensor[flip.long(), index].float()


def _encode_batch(
    encoder: torch.nn.Module, x: torch.Tensor, with_global: bool, dtype: torch.dtype, first: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Patch tokens (B, N, D) and, `with_global`, global tokens (B, D) of one batch, cast to the storage dtype."""
    if with_global:
        out = encoder.encode(x, global_token=True)  # one forward: the tokens equal encoder(x)
        parts = [out.tokens, out.global_token]
    else:
        parts = [encoder(x)]
    stored = []
    for values in parts:
        values = values.float().cpu()
        cast = values.to(dtype)
        if not bool(torch.isfinite(cast).all()):  # float16 overflow becomes inf
            kind = "are not finite" if not bool(torch.isfinite(values).all()) else "exceed the float16 range"
            raise ValueError(
                f"{encoder.name} targets of images {first}..{first + len(x) - 1} {kind}; float32 storage: "
                "dtype=torch.float32"
            )
        stored.append(cast)
    return stored[0], (stored[1] if with_global else None)


@torch.no_grad()
def build_target_cache(
    encoder: torch.nn.Module,
    images_uint8: torch.Tensor | np.ndarray,
    path: str | Path,
    batch_size: int = 64,
    flips: tuple[bool, ...] = (False,),
    progress: bool = True,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    flush_seconds: float = 10.0,
    global_token: bool = False,
) -> TargetCache:
    """Compute `encoder(images)` for every image (and its mirror image if True in `flips`) into a cache file, with
    the encoder's global token beside the patch tokens (`Encoder.encode`; encoders without `encode` store none).

    Args:
        encoder: a `repa.encoders.Encoder` (its device is used).
        images_uint8: (N, H, W) or (N, 1|3, H, W) uint8, the training images in dataset order.
        path: output .safetensors file.
        batch_size: images per encoder call (also the resume granularity).
        flips: (False,) or (False, True): which versions of each image to encode.
        progress: tqdm bar.
        dtype: float16 (default) or float32 storage; float16 refuses values outside its range.
        overwrite: rebuild an existing cache whose metadata differs instead of raising.
        flush_seconds: how often finished batches are synced to disk and recorded for resuming.
        global_token: the caller needs the global tokens (REG): an existing cache without them (older format)
            is rebuilt with them.

    Returns:
        The loaded TargetCache (an existing matching cache is reused without recomputation).
    """
    images = _as_nchw(images_uint8)
    flips = tuple(bool(f) for f in flips)
    if flips not in ((False,), (False, True)):
        raise ValueError(f"flips must be (False,) or (False, True), got {flips}")
    path = Path(path)
    meta = cache_metadata(encoder, images, flips, dtype)  # the identity a reused cache must match
    with_global = callable(getattr(encoder, "encode", None))
    if global_token and not with_global:
        raise ValueError(
            f"encoder {encoder.name!r} ({type(encoder).__name__}) cannot give its global token (no encode)"
        )
    if path.exists():
        try:
            cache = TargetCache.load(path, expect=meta)
            if not (global_token and cache.global_tokens is None):
                return cache
            # a cache from before global tokens were stored: the rebuilt one holds the same patch tokens and the
            # global ones, so it serves plain REPA as before and REG as well
            if progress:
                print(f"[repa] rebuilding {path}: REG (repa.class_token) needs the encoder's global token, which this "
                      "cache (older format) does not hold")  # fmt: skip
        except TargetCacheMismatch:
            if not overwrite:
                raise
    meta = {**meta, "global_token": with_global}
    shape = (len(flips), len(images), meta["num_tokens"], meta["embed_dim"])
    global_shape = shape[:2] + shape[3:] if with_global else None
    partial, note_path = Path(f"{path}.partial"), Path(f"{path}.partial.json")
    header = _header(meta, shape, global_shape)
    note = json.loads(note_path.read_text()) if note_path.exists() and partial.exists() else {}
    np_dtype, num_tokens = _ST_DTYPES[dtype][1], int(np.prod(shape))
    num_values = num_tokens + int(np.prod(global_shape or 0))
    if note.get("meta") != meta or note.get("batch_size") != batch_size:
        note = {"meta": meta, "batch_size": batch_size, "done": 0}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            f.write(header)
            f.truncate(len(header) + num_values * np.dtype(np_dtype).itemsize)
    # the data region, mapped once: the patch tokens, then the global tokens (views of the same map)
    values = np.memmap(partial, dtype=np_dtype, mode="r+", offset=len(header), shape=(num_values,))
    out = values[:num_tokens].reshape(shape)
    out_global = None if global_shape is None else values[num_tokens:].reshape(global_shape)
    device = next((b.device for b in encoder.buffers()), torch.device("cpu"))
    starts = [(fi, s) for fi in range(len(flips)) for s in range(0, len(images), batch_size)]
    bar = tqdm(total=len(flips) * len(images), desc=f"targets {encoder.name}", disable=not progress)
    bar.update(sum(min(batch_size, len(images) - s) for _, s in starts[: note["done"]]))
    last_flush = time.monotonic()
    for j in range(note["done"], len(starts)):
        fi, s = starts[j]
        x = images[s : s + batch_size].to(device)
        stored, stored_global = _encode_batch(encoder, x.flip(-1) if flips[fi] else x, with_global, dtype, s)
        if stored.shape[1:] != shape[2:]:
            raise ValueError(f"{encoder.name} returned {tuple(stored.shape[1:])}, expected {shape[2:]}")
        out[fi, s : s + len(x)] = stored.numpy()
        if out_global is not None:
            out_global[fi, s : s + len(x)] = stored_global.numpy()
        if time.monotonic() - last_flush > flush_seconds or j + 1 == len(starts):
            values.flush()  # data first, then the note that claims it: a crash loses at most `flush_seconds` of work
            write_text_atomic(note_path, json.dumps({**note, "done": j + 1}))
            last_flush = time.monotonic()
        bar.update(len(x))
    bar.close()
    del values, out, out_global
    fsync_file(partial)
    os.replace(partial, path)
    note_path.unlink(missing_ok=True)
    return TargetCache.load(path)


def describe(meta: dict[str, Any]) -> str:
    """One line for logs."""
    return (
        f"{meta['encoder']}@{meta['resolution']}px layer {meta['layer'] or 'final'}: {meta['num_images']} images x "
        f"{len(meta['flips'])} flips x {meta['num_tokens']} tokens x {meta['embed_dim']} ({meta['dtype']})"
        + (" + global token" if meta.get("global_token") else "")
    )
