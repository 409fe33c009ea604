"""User-facing faults: exceptions that `repa` reports in one or two lines (what, which file, what to do) with a
distinct exit code instead of a traceback (`--debug` or `REPA_DEBUG=1` shows it)."""

from __future__ import annotations

import errno

# Exit codes of `repa` for faults that are not ReportedError subclasses (those carry their own `exit_code`).
# 1 is Python's own code for an uncaught exception: a bug, shown with its traceback.
EXIT_USAGE = 2  # command-line or config mistake: argparse, ValueError, KeyError, FileNotFoundError, YAML errors
EXIT_DISK = 12  # the file system refused a write or read: no space, quota, read-only, permission, I/O error
EXIT_OS = 13  # any other operating-system error (network, missing device, ...)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention)

# errno -> (the reason in words, what to do): the disk faults that end in EXIT_DISK
OS_REASONS = {
    errno.ENOSPC: ("no space left on device", "free some space, then rerun the same command"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota, then rerun the same command"),
    errno.EFBIG: ("file too large for the file system", "write to another file system"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another location"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another location"),
    errno.EIO: ("input/output error", "check the disk"),
}


class ReportedError(Exception):
    """A documented user-facing fault. Subclasses set `exit_code` (see docs/reliability.md for the table); the
    message says what went wrong, which file, and what to do."""

    exit_code: int = 3  # a subclass without its own code (1 is a bug's, 2 a usage mistake's)


def brief(err: BaseException) -> str:
    """`TypeName: first line of the message`: a wrapped exception in a one-line report."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
