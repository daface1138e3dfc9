"""Per-epoch training curves of the folds: one long table (a row per fold and epoch, epochs
from 1), which ``dvc plots show`` draws with a line per fold, and the same figure for MLflow.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display: must be chosen before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("val_dice", "validation Dice"), ("val_loss", "validation loss"))


def curve_rows(histories: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Rows ``{"fold", "epoch", <metric>...}`` of every history, epochs from 1."""
    rows: list[dict[str, Any]] = []
    for name, hist in histories.items():
        n = max((len(v) for v in hist.values()), default=0)
        for e in range(n):
            row: dict[str, Any] = {"fold": name, "epoch": e + 1}
            row.update({k: round(v[e], 6) for k, v in sorted(hist.items()) if e < len(v)})
            rows.append(row)
    return rows


def write_curves_csv(path: Path, histories: dict[str, dict[str, list[float]]]) -> None:
    """The long table of :func:`curve_rows` as CSV (columns: fold, epoch, metrics sorted)."""
    rows = curve_rows(histories)
    keys = sorted({k for r in rows for k in r} - {"fold", "epoch"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["fold", "epoch", *keys])
        w.writeheader()
        w.writerows(rows)


def curves_figure(histories: dict[str, dict[str, list[float]]]) -> Any:
    """Validation Dice and loss per epoch, a line per fold."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(10, 4), dpi=100)
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for name, hist in histories.items():
            values = hist.get(key, [])
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)  # mlflow.log_figure saves it; pyplot need not keep it
    return fig
