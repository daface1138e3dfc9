"""``make compare``: ``dvc exp show --csv`` cut to the columns that matter, in 100 characters.

``dvc exp show`` has a column per param and metric (about 60 here) and truncates what does not
fit the terminal; this keeps the baseline and every experiment with CV Dice, test Dice, HD95,
learning rate, batch size and model cost, numbers rounded. Reads the CSV on stdin.

Usage: ``dvc exp show --csv | python -m liverseg.compare``
"""

from __future__ import annotations

import csv
import sys
from typing import TextIO

# dvc exp show column -> (header, format)
COLUMNS = {
    "cv_val_dice_mean": ("CV Dice", "{:.4f}"),
    "cv_val_dice_std": ("± std", "{:.4f}"),
    "dice_mean": ("test Dice", "{:.4f}"),
    "hd95_mm_mean": ("HD95 mm", "{:.1f}"),
    "learning_rate": ("lr", "{:.2e}"),
    "batch_size": ("batch", "{:.0f}"),
    "model_gflops": ("GFLOP", "{:.3f}"),
}


def table(rows: list[dict[str, str]]) -> str:
    """Aligned text table: one line per revision/experiment (``-`` where a figure is missing)."""
    lines = [["experiment", *(h for h, _ in COLUMNS.values())]]
    for row in rows:
        name = row.get("Experiment") or row.get("rev", "?")
        if row.get("typ", "").startswith("branch_"):
            name = f"  {name}"  # experiments indented under their baseline, as DVC does
        cells = [name]
        for key, (_, fmt) in COLUMNS.items():
            value = row.get(key, "")
            try:
                cells.append(fmt.format(float(value)))
            except ValueError:
                cells.append(value or "-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def main(stdin: TextIO | None = None) -> int:
    rows = list(csv.DictReader(stdin or sys.stdin))
    if not rows:
        print("compare: no rows (is this a DVC repository with `dvc exp show` output?)")
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
