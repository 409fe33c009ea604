"""Writers for analysis tables (lists of row dicts): CSV, JSON and a layer x t heatmap PNG (matplotlib Agg)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repa.fileio import write_json  # noqa: F401 (the analysis writers, in one place)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write rows (same keys, first row's order) as CSV with a header."""
    if not rows:
        raise ValueError("no rows to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def table_grid(
    rows: Sequence[dict[str, Any]], value: str, row_key: str = "layer", col_key: str = "t"
) -> tuple[list[Any], list[Any], np.ndarray]:
    """Pivot rows into (row labels, column labels, (R, C) array); missing cells are NaN.

    Args:
        rows: table rows, e.g. from `probe_layers` or `alignment_table` (filter to one target/metric first).
        value: the key holding the cell value.
        row_key, col_key: keys for the grid axes.

    Returns:
        Sorted row labels, sorted column labels, and the grid.
    """
    r_labels = sorted({row[row_key] for row in rows})
    c_labels = sorted({row[col_key] for row in rows})
    grid = np.full((len(r_labels), len(c_labels)), np.nan)
    for row in rows:
        grid[r_labels.index(row[row_key]), c_labels.index(row[col_key])] = float(row[value])
    return r_labels, c_labels, grid


def heatmap(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    value: str = "test_acc",
    row_key: str = "layer",
    col_key: str = "t",
    title: str | None = None,
    fmt: str = ".2f",
) -> None:
    """Save a heatmap PNG of `value` with `row_key` (layers) down and `col_key` (noise levels) across.

    Args:
        rows: table rows (one value per (row, col) cell).
        path: output PNG.
        value: which key to plot (e.g. "test_acc" for probes, "value" for alignment rows).
        row_key, col_key: grid axes.
        title: figure title (default: `value`).
        fmt: number format for the cell annotations.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe to call repeatedly
    import matplotlib.pyplot as plt

    r_labels, c_labels, grid = table_grid(rows, value, row_key, col_key)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(c_labels), 1.0 + 0.45 * len(r_labels)), dpi=120)
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(c_labels)), [f"{c:g}" if isinstance(c, float) else str(c) for c in c_labels])
    ax.set_yticks(range(len(r_labels)), [str(r) for r in r_labels])
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    ax.set_title(title or value)
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                color = "black" if grid[i, j] > mid else "white"
                ax.text(j, i, format(grid[i, j], fmt), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_tables(
    out: Path, name: str, rows: list[dict[str, Any]], meta: dict[str, Any], title: str,
    metrics: Sequence[str] | None = None, extra: dict[str, Any] | None = None, **layout: Any,
) -> None:  # fmt: skip
    """`<name>.csv`, `<name>.json` ({meta, rows, **extra}) and the heat map `<name>.png`, or with `metrics` one
    `<name>-<metric>.png` per metric (`layout`: `heatmap`'s value/row_key/col_key)."""
    write_csv(rows, out / f"{name}.csv")
    write_json({"meta": meta, "rows": rows, **(extra or {})}, out / f"{name}.json")
    if metrics is None:
        heatmap(rows, out / f"{name}.png", title=title, **layout)
    for metric in metrics or ():
        heatmap([r for r in rows if r["metric"] == metric], out / f"{name}-{metric}.png", title=f"{metric}: {title}",
                **layout)  # fmt: skip
