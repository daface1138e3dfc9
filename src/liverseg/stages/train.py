"""`train` stage: k-fold cross-validation and the final model, tracked in MLflow.

Writes ``models/`` (``model.keras`` and ``preprocessing.json``, what inference needs) and
``reports/train/`` (``metrics.json`` per fold and mean/std, ``curves.csv`` the folds' per-epoch
curves (epochs from 1),
``run.json`` with the MLflow run ids that evaluate and register link to).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from liverseg.errors import DataError
from liverseg.fsutil import atomic_dir, write_json
from liverseg.params import TrainParams, load_section

ARTIFACT_ROOT = Path("mlruns/artifacts")


def tuned_values(cfg: TrainParams, tuned: Path | None) -> tuple[float, int, str]:
    """(learning rate, batch size, where they came from)."""
    if not cfg.use_tuned or tuned is None:
        return cfg.learning_rate, cfg.batch_size, "params.yaml"
    try:
        best = json.loads(tuned.read_text())
        return float(best["learning_rate"]), int(best["batch_size"]), str(tuned)
    except FileNotFoundError as exc:
        raise DataError(
            f"{tuned}: not found; run the tune stage or set train.use_tuned: false"
        ) from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{tuned}: not a tuning result ({exc})") from exc


def main(args: argparse.Namespace) -> None:
    cfg: TrainParams = load_section("train", args.params)
    lr, batch_size, source = tuned_values(cfg, args.tuned)

    import keras
    import mlflow

    from liverseg.training.crossval import cross_validate
    from liverseg.training.curves import write_curves_csv
    from liverseg.training.tracking import (
        content_hash,
        dvc_experiment,
        dvc_out_hash,
        ensure_experiment,
        git_commit,
    )

    if cfg.precision != "float32":
        keras.mixed_precision.set_global_policy(cfg.precision)
    keras.utils.set_random_seed(cfg.seed)

    root = ARTIFACT_ROOT if mlflow.get_tracking_uri().startswith("sqlite:///mlruns") else None
    exp_id = ensure_experiment(cfg.experiment, root)
    tags = {
        "git_commit": git_commit(),
        "data_dvc_md5": dvc_out_hash(args.prepared),
        "data_sha256": content_hash(args.prepared),
        "seed": str(cfg.seed),
        "dvc_exp": dvc_experiment(),
    }
    digest = tags["data_dvc_md5"] if tags["data_dvc_md5"] != "unknown" else tags["data_sha256"]
    result = cross_validate(
        args.prepared,
        cfg,
        learning_rate=lr,
        batch_size=batch_size,
        experiment_id=exp_id,
        tags=tags,
        extra_params={"hparams_source": source},
        data_digest=digest,
        dvc_exp=tags["dvc_exp"],
    )
    meta = json.loads((args.prepared / "meta.json").read_text())["params"]
    with atomic_dir(args.model_dir) as tmp:
        result.final_model.save(tmp / "model.keras")
        write_json(
            tmp / "preprocessing.json",
            {"window": meta["window"], "image_size": meta["image_size"]},
        )
    metrics: dict[str, Any] = {k: v for k, v in result.summary.items() if k not in ("folds",)}
    metrics.update(
        {"learning_rate": lr, "batch_size": batch_size, "folds": result.summary["folds"]}
    )
    with atomic_dir(args.reports) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_curves_csv(
            tmp / "curves.csv",
            {k: v for k, v in result.histories.items() if k.startswith("fold")},
        )
        write_json(
            tmp / "run.json",
            {
                "experiment_id": exp_id,
                "parent_run_id": result.parent_run_id,
                "final_run_id": result.final_run_id,
                "tracking_uri": mlflow.get_tracking_uri(),
            },
        )
    print(
        f"train: CV val Dice {metrics['cv_val_dice_mean']:.4f} ± {metrics['cv_val_dice_std']:.4f}"
        f" (lr {lr:.2e}, batch {batch_size}); MLflow run {result.parent_run_id}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--tuned", type=Path, default=None, help="best_params.json of tune")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
