"""User-facing faults: exceptions that `repa` reports in one or two lines (what, which file, what to do) with a
distinct exit code instead of a traceback (`--debug` or `REPA_DEBUG=1` shows it)."""

from __future__ import annotations


class ReportedError(Exception):
    """A documented user-facing fault. Subclasses set `exit_code` (see docs/reliability.md for the table)."""

    exit_code: int = 1
