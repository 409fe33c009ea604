"""ADM-layout .npz batches: streaming reads of `arr_0` images (N, H, W, C) uint8 without loading them whole.

ADM's reference batches (e.g. `VIRTUAL_imagenet256_labeled.npz`) hold `arr_0` (10,000 images NHWC uint8) and the
precomputed statistics `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial); sample batches hold `arr_0`
(50,000 images) and optionally `arr_1` (labels). Everything is read with `allow_pickle=False`.

A file that is not a zip archive, is truncated, has a damaged member (CRC, deflate stream), lacks the array or holds
an object array is reported as `NpzError` naming the file (a ValueError, as callers expect).
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from repa.errors import ReportedError
from repa.fileio import atomic_file

# what zipfile / numpy raise on a damaged archive or member (FileNotFoundError & co. already name the file)
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, struct.error, IndexError)


class NpzError(ReportedError, ValueError):
    """An .npz that cannot be read as an ADM batch or statistics file; the message names the file and the cause."""

    exit_code = 2


def _damaged(path: str | Path, err: BaseException, what: str = "") -> NpzError:
    if isinstance(err, NpzError):
        return err
    cause = "not a zip archive, or truncated" if isinstance(err, zipfile.BadZipFile) and "zip file" in str(err) else ""
    detail = f"{type(err).__name__}: {err}"
    return NpzError(f"{path}{what}: damaged or unreadable .npz ({cause + '; ' if cause else ''}{detail})")


class NpzArrayStream:
    """Batches of one array of an .npz, read sequentially from the zip member (stored or deflated).

    Args:
        stream: an open binary file positioned after the .npy header, or None when `array` is given.
        shape, dtype: of the whole array.
        array: an in-memory array (used for layouts the streaming reader does not handle).
        name: how errors name the array (e.g. "samples.npz:arr_0").
    """

    def __init__(
        self, stream, shape: tuple[int, ...], dtype: np.dtype, array: np.ndarray | None = None, name: str = "array"
    ) -> None:
        self._stream, self.shape, self.dtype, self._array = stream, tuple(shape), np.dtype(dtype), array
        self.name = name
        self._pos = 0

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, count: int) -> np.ndarray | None:
        """The next `count` rows (fewer at the end), or None when exhausted."""
        count = min(count, self.shape[0] - self._pos)
        if count <= 0:
            return None
        if self._array is not None:
            out = self._array[self._pos : self._pos + count]
        else:
            nbytes = count * int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
            buf = bytearray()
            while len(buf) < nbytes:
                try:
                    chunk = self._stream.read(nbytes - len(buf))
                except _DAMAGED as err:
                    raise NpzError(
                        f"{self.name}: damaged array data at row {self._pos} ({type(err).__name__}: {err})"
                    ) from err
                if not chunk:
                    raise NpzError(
                        f"{self.name}: truncated array: rows {self._pos}.. need {nbytes} bytes, the file has {len(buf)}"
                    )
                buf += chunk
            out = np.frombuffer(buf, dtype=self.dtype).reshape(count, *self.shape[1:])
        self._pos += count
        return out

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield the remaining rows in batches of `batch_size`."""
        while (batch := self.read(batch_size)) is not None:
            yield batch


@contextmanager
def open_npz_array(path: str | Path, key: str = "arr_0") -> Iterator[NpzArrayStream]:
    """Open `key` of an .npz for streaming reads.

    Args:
        path: the .npz file.
        key: array name (`arr_0` = images in ADM's layout).

    Yields:
        An NpzArrayStream; object arrays are refused (no pickle).

    Raises:
        NpzError: not a zip archive, truncated, damaged header, no such array, object array (names the file).
    """
    try:
        zf = zipfile.ZipFile(path)
    except _DAMAGED as err:
        raise _damaged(path, err) from err
    with zf:
        member = f"{key}.npy"
        if member not in zf.namelist():
            raise NpzError(f"{path} has no array {key!r} (has: {[n[:-4] for n in zf.namelist()]})")
        try:
            f = zf.open(member)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                shape, fortran, dtype = None, True, None
        except _DAMAGED as err:
            raise _damaged(path, err, f":{key}") from err
        with f:
            if dtype is not None and dtype.hasobject:
                raise NpzError(f"{path}:{key} is an object array; refusing to unpickle it")
            if fortran:  # rare layouts: load this one array in memory
                arr = read_npz_arrays(path, [key])[key]
                yield NpzArrayStream(None, arr.shape, arr.dtype, array=arr, name=f"{path}:{key}")
            else:
                yield NpzArrayStream(f, shape, dtype, name=f"{path}:{key}")


def npz_keys(path: str | Path) -> list[str]:
    """Names of the arrays stored in an .npz (NpzError naming the file when it is not a readable zip archive)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except _DAMAGED as err:
        raise _damaged(path, err) from err


def check_npz_inputs(*paths: str | Path) -> None:
    """Refuse, naming the file, any `.npz` among `paths` that is missing or not a readable archive (other inputs,
    such as folders or `fashion-mnist:<split>`, are left to their readers)."""
    for path in paths:
        if str(path).endswith(".npz"):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path} does not exist")
            npz_keys(path)


def read_npz_arrays(path: str | Path, keys: list[str]) -> dict[str, np.ndarray]:
    """Load a few (small) arrays by name, e.g. `["mu", "sigma"]` or `["arr_1"]`; missing keys are skipped.

    NpzError (naming the file, keeping numpy's reason, e.g. "allow_pickle=False") when the file or a member is
    damaged or holds objects."""
    if not zipfile.is_zipfile(path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist")
        raise NpzError(f"{path}: damaged or unreadable .npz (not a zip archive, or truncated)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in keys if k in data.files}
    except _DAMAGED as err:
        raise _damaged(path, err) from err


def _check_images(path: str | Path, arr: NpzArrayStream) -> None:
    if arr.dtype != np.uint8 or len(arr.shape) != 4:
        raise NpzError(f"{path}: arr_0 must be uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")


def image_batches(path: str | Path, batch_size: int = 250, limit: int | None = None) -> Iterator[np.ndarray]:
    """Yield uint8 NHWC image batches of `arr_0`, at most `limit` images in total.

    Args:
        path: an ADM-layout .npz.
        batch_size: images per batch.
        limit: stop after this many images (None = all).

    Yields:
        (b, H, W, C) uint8 arrays.
    """
    with open_npz_array(path, "arr_0") as arr:
        _check_images(path, arr)
        remaining = len(arr) if limit is None else min(limit, len(arr))
        while remaining > 0 and (batch := arr.read(min(batch_size, remaining))) is not None:
            remaining -= len(batch)
            yield batch


def num_images(path: str | Path) -> int:
    """Number of images in `arr_0` (read from the header only)."""
    with open_npz_array(path, "arr_0") as arr:
        _check_images(path, arr)
        return len(arr)


def save_samples(path: str | Path, images: np.ndarray | Sequence[np.ndarray], labels: np.ndarray | None = None) -> None:
    """Write an ADM-layout sample file, whole or not at all: `arr_0` uint8 NHWC, optional `arr_1` labels (int64).

    `images` may be one array or several parts of the same layout (memory-mapped shards, for example), written in
    order and streamed 1,024 images at a time, so the whole batch never has to be in memory."""
    parts = [np.asarray(images)] if isinstance(images, np.ndarray) else [np.asarray(p) for p in images]
    for part in parts:
        if part.dtype != np.uint8 or part.ndim != 4 or part.shape[1:] != parts[0].shape[1:]:
            raise ValueError(f"images must be uint8 (N, H, W, C) of one shape, got {part.dtype} {part.shape}")
    with atomic_file(path, suffix=".npz") as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for part in parts:
                for start in range(0, len(part), 1024):
                    f.write(np.ascontiguousarray(part[start : start + 1024]).tobytes())
        if labels is not None:
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64), allow_pickle=False)
