"""`train` stage: k-fold cross-validation and the final model, tracked in MLflow
(:func:`liverseg.training.crossval.train`). Writes ``models/`` (``model.keras``,
``preprocessing.json``) and ``reports/train/`` (``metrics.json``, ``curves.csv``, ``run.json``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from liverseg.fsutil import atomic_dir, write_json
from liverseg.params import TrainParams, load_section
from liverseg.tuning.best_params import read_best_params


def main(args: argparse.Namespace) -> None:
    cfg: TrainParams = load_section("train", args.params)
    lr, batch_size, source = cfg.learning_rate, cfg.batch_size, "params.yaml"
    if cfg.use_tuned and args.tuned is not None:
        (lr, batch_size), source = read_best_params(args.tuned), str(args.tuned)

    from liverseg.model.folder import save_model_dir
    from liverseg.tracking import write_train_run as write_run
    from liverseg.training.crossval import train, write_curves_csv

    out = train(args.prepared, cfg, learning_rate=lr, batch_size=batch_size, hparams_source=source)
    save_model_dir(args.model_dir, out.model, out.window, out.image_size, out.context_mm, out.crop)
    with atomic_dir(args.reports) as tmp:
        write_json(tmp / "metrics.json", out.metrics)
        write_curves_csv(tmp / "curves.csv", out.curves)
        write_run(tmp / "run.json", out.run)
    print(
        f"train: CV val Dice {out.metrics['cv_val_dice_mean']:.4f} ± "
        f"{out.metrics['cv_val_dice_std']:.4f} (lr {lr:.2e}, batch {batch_size}); MLflow run "
        f"{out.run['parent_run_id']}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--tuned", type=Path, default=None, help="best_params.json of tune")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
