"""`evaluate` stage: the Segmenter on every held-out test patient, 3-D metrics in mm, the
quality report of :mod:`liverseg.evaluation.quality` and how well its agreement ranks the true
Dice (Spearman's rho: what ``evaluate.quality.min_agreement`` rests on).

Writes ``reports/evaluate/``: ``metrics.json`` (mean, std and per patient), ``per_patient.csv``
and ``overlays/<case>_z<k>.png``; logs the same to an MLflow run under the training run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from liverseg.evaluation.holdout import evaluate, log_to_mlflow
from liverseg.params import EvaluateParams, load_section
from liverseg.tracking import read_train_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--train-run", type=Path, required=True, help="train's run.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))


def main(args: argparse.Namespace) -> None:
    cfg: EvaluateParams = load_section("evaluate", args.params)
    link = read_train_run(args.train_run)  # before the model runs, not after
    result = evaluate(args.raw, args.prepared, args.model_dir, args.out, cfg)
    run_id = log_to_mlflow(result, args.out, cfg, link, args.raw)
    print(
        f"evaluate: {result['n_scans']} scans of {result['n_patients']} test patients: Dice "
        f"{result['dice_mean']:.4f} ± "
        f"{result['dice_std']:.4f}, HD95 {result['hd95_mm_mean']:.1f} mm (MLflow run {run_id})"
    )
