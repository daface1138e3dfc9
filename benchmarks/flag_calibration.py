"""Where to set the review flag's agreement threshold: what each threshold would flag.

    python benchmarks/flag_calibration.py run42/heldout.csv run42/real.csv run43/... \\
        [--thresholds 0.88 0.89 0.9 0.91 0.92] [--low 0.88] [--high 0.93]

Reads the tables of ``benchmarks/real_ct.py --csv`` (any number: several seeds, held-out
synthetic scans and real ones together) and prints the rank correlation of the ensemble
agreement with the Dice over all of them (n, Spearman rho, p), then for each threshold how many
scans the agreement alone would flag among those below ``--low``, between, and above
``--high`` (the issue's bar: flag every scan below 0.88 and none above 0.93), and how many the
run's own flag (all reasons, at the run's ``evaluate.quality``) raised. The agreements of the
scans below ``--low`` and above ``--high`` are listed: the margin a threshold has.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from liverseg.evaluation.holdout import agreement_vs_dice


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="+", type=Path, help="tables written by real_ct.py --csv")
    ap.add_argument("--thresholds", nargs="+", type=float, default=[0.88, 0.89, 0.9, 0.91, 0.92])
    ap.add_argument("--low", type=float, default=0.88)
    ap.add_argument("--high", type=float, default=0.93)
    args = ap.parse_args(argv)
    rows = []
    for path in args.csv:
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                if r["agreement"]:  # a single model has no agreement
                    rows.append(
                        {
                            "dice": float(r["dice"]),
                            "agreement": float(r["agreement"]),
                            "review": r["review"] == "True",
                        }
                    )
    corr = agreement_vs_dice(rows)
    rho = "undefined" if corr["rho"] is None else f"{corr['rho']:.3f} (p {corr['p']:.2g})"
    print(f"n {corr['n']}, Spearman rho of agreement and Dice {rho}")
    bands = {
        f"below {args.low:g}": [r for r in rows if r["dice"] < args.low],
        "between": [r for r in rows if args.low <= r["dice"] <= args.high],
        f"above {args.high:g}": [r for r in rows if r["dice"] > args.high],
    }

    def row(label: str, cells: list) -> None:
        print(f"| {label} | " + " | ".join(map(str, cells)) + " |")

    row("flagged", [f"{b} (n {len(v)})" for b, v in bands.items()])
    print("|---" * (len(bands) + 1) + "|")
    for t in args.thresholds:
        row(f"agreement < {t:g}", [sum(r["agreement"] < t for r in v) for v in bands.values()])
    row("the runs' flag, all reasons", [sum(r["review"] for r in v) for v in bands.values()])
    low, _, high = bands
    for name in (low, high):
        agreements = sorted(round(r["agreement"], 3) for r in bands[name])
        print(f"agreement of the scans {name}: {agreements}")


if __name__ == "__main__":
    main()
