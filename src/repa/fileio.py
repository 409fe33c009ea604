"""Small file helpers shared across the package: JSON written whole or not at all, and the reason a write failed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from repa.errors import OS_REASONS, brief


@contextlib.contextmanager
def atomic_file(dest: str | Path, suffix: str = "") -> Iterator[BinaryIO]:
    """A binary file to write `dest` through: a temporary file beside it (`.<name>.tmp-*`, hidden) that replaces
    `dest` (mode 0644, whatever the umask) when the block ends, fsync'ed first, and is deleted if the block raises, so
    `dest` is never half-written."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data reaches the disk before the rename publishes it
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a whole text file (UTF-8) or nothing, through `atomic_file`."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk (before the rename that publishes it)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_json(obj: Any, path: str | Path, indent: int = 2) -> None:
    """Write any JSON-serialisable object (rows, metrics dicts) with indentation, atomically (temp file + rename)."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_error_reason(err: BaseException, root: Path) -> str:
    """A short reason for a failed write. safetensors reports `... (os error 28)` and torch.save a bare
    `unexpected pos` RuntimeError on a full disk, so the free space is checked as well."""
    code = getattr(err, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(err))
        code = int(m.group(1)) if m else None
    if code in OS_REASONS:
        return OS_REASONS[code][0]
    text = brief(err)
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return text
    return f"no space left on device ({free} bytes free; {text})" if free < 1 << 20 else text
