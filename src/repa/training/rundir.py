"""One training process per run directory: a lock file naming its holder, held with `flock`, with a heartbeat.

Two `repa train` on one run directory would prune each other's checkpoints mid-write and append to the same
`metrics.jsonl`; the second one is refused at start with the holder's pid and host. A lock left behind by a
killed process never blocks the next run: on the same machine the kernel releases the `flock` of a dead process
(exact, immune to pid reuse); a holder on another machine (a shared file system, where `flock` may not reach) is
taken for gone once its heartbeat (the lock file's modification time, refreshed every `HEARTBEAT_S` seconds by a
thread) is older than `STALE_AFTER_S` seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from repa.errors import ReportedError
from repa.fileio import write_text_atomic

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # heartbeat period + NFS attribute caching (<= 60 s) + clock skew, with a wide margin


class RunLockedError(ReportedError, RuntimeError):
    """Another live process trains in this run directory."""

    exit_code = 20


def _boot_id() -> str:
    """Tells machines (and boots) apart even when two share a host name (containers, recycled node names)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def holder_info() -> dict[str, Any]:
    """What the lock file says about this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}  # fmt: skip


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(holder: dict[str, Any]) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    return f"{who}, started {holder['started']}" if holder.get("started") else who


class RunDirLock:
    """Context manager: hold `<run_dir>/train.lock` while training.

    Raises:
        RunLockedError: a live process holds the lock (the message names its pid, host and start time).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._flock = True  # False on a file system without locks: liveness from the pid and the heartbeat
        self.took_over: dict[str, Any] | None = None  # the stale holder replaced, if any

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without locks
                    self._flock = False
                    break
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise RunLockedError(self._refusal(self._read(), "holds it")) from None
            if self._same_file(fd):  # not a file a releasing holder unlinked between our open and flock
                break
            os.close(fd)
        try:
            previous = self._read()
            if previous and not self._stale(previous):
                raise RunLockedError(
                    self._refusal(
                        previous,
                        f"holds it (its heartbeat is {self._age():.0f} s old; "
                        f"a holder is taken for gone after {STALE_AFTER_S:.0f} s)",
                    )
                )
            self.took_over = previous or None
            data = json.dumps(holder_info()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._beat = threading.Thread(target=self._heartbeat, name="repa-run-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with contextlib.suppress(OSError):
            self.path.unlink()  # before the flock goes: a waiting opener of this inode sees it unlinked and retries
        os.close(self._fd)
        self._fd = None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}  # empty (created, never written) or torn by a kill: nobody to name
        return data if isinstance(data, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        """We hold the flock, so no process on this machine holds the lock; one on another machine may (a shared
        file system's flock may not reach across machines): it is alive while its heartbeat is recent."""
        if holder.get("host") == socket.gethostname() and holder.get("boot_id", "") == _boot_id():
            return self._flock or not _pid_alive(holder.get("pid"))
        return self._age() > STALE_AFTER_S

    def _age(self) -> float:
        """Seconds since the holder's last heartbeat."""
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")

    def _refusal(self, holder: dict[str, Any], what: str) -> str:
        who = describe_holder(holder) if holder else "another process"
        return (f"run directory {self.path.parent} is in use: {who} {what} ({self.path}). Two trainings in one run "
                "directory would delete each other's checkpoints; wait for it to finish, stop it, or choose another "
                f"train.run_dir (if that process is surely gone, delete {self.path})")  # fmt: skip


def trim_metrics(path: str | Path, step: int) -> None:
    """On resume from `step`: keep only the complete records of steps <= `step` in the metrics JSON-lines file, so
    the replayed steps are not logged twice and a line torn by a kill is dropped. Rewritten atomically."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))
