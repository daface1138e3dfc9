"""``make compare``: ``dvc exp show --csv`` (on stdin) cut to the columns that matter.

``dvc exp show`` has a column per param and metric (about 60 here) and truncates what does not
fit the terminal; this prints, in 100 characters, the baseline and every experiment with CV
Dice, test Dice, HD95, learning rate, batch size and model cost, rounded; then the params whose
values differ between them, such as ``train.epochs``.

Usage: ``dvc exp show --csv | python -m liverseg.compare``
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

# dvc exp show column -> (header, format of the number; "" for the text as it is)
COLUMNS = {
    "cv_val_dice_mean": ("CV Dice", "{:.4f}"),
    "cv_val_dice_std": ("± std", "{:.4f}"),
    "dice_mean": ("test Dice", "{:.4f}"),
    "hd95_mm_mean": ("HD95 mm", "{:.1f}"),
    "learning_rate": ("lr", "{:.2e}"),
    "batch_size": ("batch", "{:.0f}"),
    "model_gflops": ("GFLOP", "{:.3f}"),
}


def param_keys(params: Path = Path("params.yaml")) -> list[str]:
    """The dotted keys of ``params`` (``train.model.depth``), as ``dvc exp show`` names its
    param columns; none if the file is missing."""
    if not params.is_file():
        return []

    def walk(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict) and node:
            return [k for key, value in node.items() for k in walk(value, f"{prefix}{key}.")]
        return [prefix[:-1]]

    return walk(yaml.safe_load(params.read_text()) or {}, "")


def table(rows: list[dict[str, str]], columns: dict[str, tuple[str, str]] = COLUMNS) -> str:
    """Aligned text table: one line per revision/experiment (``-`` where a figure is missing)."""
    lines = [["experiment", *(h for h, _ in columns.values())]]
    for row in rows:
        # experiments indented under their baseline, as DVC does
        indent = "  " if row.get("typ", "").startswith("branch_") else ""
        cells = [indent + (row.get("Experiment") or row.get("rev", "?"))]
        for key, (_, fmt) in columns.items():
            value = row.get(key, "")
            try:
                cells.append(fmt.format(float(value)) if fmt else value or "-")
            except ValueError:
                cells.append(value or "-")
        lines.append(cells)
    widths = [max(map(len, column)) for column in zip(*lines, strict=True)]
    just = [str.ljust] + [str.rjust] * (len(widths) - 1)  # names left, figures right
    return "\n".join(
        "  ".join(j(c, w) for j, c, w in zip(just, line, widths, strict=True)) for line in lines
    )


def main(stdin: TextIO | None = None) -> int:
    rows = list(csv.DictReader(stdin or sys.stdin))
    if not rows:
        print("compare: no rows (is this a DVC repository with `dvc exp show` output?)")
        return 1
    print(table(rows))
    keys = [k for k in param_keys() if k not in COLUMNS]
    changed = [k for k in keys if len({row.get(k, "") for row in rows}) > 1]
    if changed:
        print("\nparams that differ:")
        print(table(rows, {k: (k, "") for k in changed}))  # as params.yaml writes them
    return 0


if __name__ == "__main__":
    sys.exit(main())
