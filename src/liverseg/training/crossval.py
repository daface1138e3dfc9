"""What the ``train`` stage does: patient-level k-fold cross-validation and the final model,
recorded in MLflow, and what the stage writes: among it the folds' per-epoch curves, one long
table (a row per fold and epoch, epochs from 1) that ``dvc plots show`` draws with a line per
fold, and the same figure for MLflow.

MLflow layout (one experiment): a parent run ``cv`` holding all params, the seed, git commit
and data hash tags, and mean/std over folds; a child run per fold (``fold-0`` ...) with
per-epoch metrics, its case ids and its best weights as a Keras model; and a child run
``final`` with the model that the later stages use.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
from matplotlib.figure import Figure

from liverseg.data.prepared import load_meta, load_prepared, load_splits
from liverseg.data.splits import fold_cases, trainval_cases
from liverseg.model.unet import count_flops
from liverseg.params import TrainParams, as_flat_dict
from liverseg.tracking import (
    NOTE_TAG,
    content_hash,
    dvc_out_hash,
    ensure_experiment,
    git_commit,
    headline_metrics,
    log_dataset,
    log_params_flat,
)
from liverseg.training.fit import MlflowEpochLogger, fit, keras_session
from liverseg.training.folds import (
    FoldJob,
    FoldOutcome,
    fold_key,
    log_keras_model,
    reuse_fold,
    run_folds,
)
from liverseg.workers import processes_for, threads_per_process

log = logging.getLogger(__name__)
PANELS = (("val_dice", "validation Dice"), ("val_loss", "validation loss"))


def write_curves_csv(path: Path, histories: dict[str, dict[str, list[float]]]) -> None:
    """The folds' histories as a long CSV table: fold, epoch (from 1), the metrics sorted."""
    rows: list[dict[str, Any]] = []
    for name, hist in histories.items():
        for e in range(max((len(v) for v in hist.values()), default=0)):
            row: dict[str, Any] = {"fold": name, "epoch": e + 1}
            row.update({k: round(v[e], 6) for k, v in sorted(hist.items()) if e < len(v)})
            rows.append(row)
    keys = sorted({k for r in rows for k in r} - {"fold", "epoch"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["fold", "epoch", *keys])
        w.writeheader()
        w.writerows(rows)


def curves_figure(histories: dict[str, dict[str, list[float]]]) -> Any:
    """Validation Dice and loss per epoch, a line per fold."""
    # A Figure without pyplot: no backend to choose, no global figure to close.
    fig = Figure(figsize=(10, 4), dpi=100)
    axes = fig.subplots(1, len(PANELS))
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
    return fig


def ensemble(models: list[keras.Model]) -> keras.Model:
    """One Keras model averaging the probabilities of ``models`` (the fold ensemble)."""
    inp = keras.Input(shape=(None, None, models[0].inputs[0].shape[-1]), name="image")
    # The fold models share one name; a functional model needs unique names, so each member
    # is re-wrapped (same layers and weights) under its own.
    members = [keras.Model(m.input, m.output, name=f"fold_{i}") for i, m in enumerate(models)]
    outs = [m(inp) for m in members]
    out = keras.layers.Average(name="mean_prob")(outs) if len(outs) > 1 else outs[0]
    return keras.Model(inp, out, name="fold_ensemble")


@dataclass
class TrainOutputs:
    """The final model with the preprocessing it expects, and the stage's reports."""

    model: keras.Model
    window: list[float]  # the prepare stage's HU window, [low, high]
    image_size: int
    context_mm: float  # the prepare stage's: where the neighbour channels sit (0: none)
    crop: str  # the prepare stage's in-plane crop: body (its square) | none (data before it)
    metrics: dict[str, Any]  # metrics.json: CV summary, learning rate, batch size, folds
    curves: dict[str, dict[str, list[float]]]  # the folds' per-epoch histories (curves.csv)
    run: dict[str, str]  # run.json: the MLflow runs that evaluate and register link to


def train(
    prepared: Path,
    cfg: TrainParams,
    *,
    learning_rate: float,
    batch_size: int,
    hparams_source: str = "params.yaml",
) -> TrainOutputs:
    """Cross-validate ``cfg``'s model on ``prepared`` with the given learning rate and batch
    size (``hparams_source``: where they came from, a param) and build the final model, in
    experiment ``cfg.experiment`` of the current tracking URI; every run ends FINISHED or
    FAILED (KILLED after a stop)."""
    keras_session(cfg.precision, cfg.seed)
    exp_id = ensure_experiment(cfg.experiment)
    dvc_exp = os.environ.get("DVC_EXP_NAME", "")  # the `dvc exp run` experiment, or empty
    tags = {
        "git_commit": git_commit(),
        "data_dvc_md5": dvc_out_hash(prepared),
        "data_sha256": content_hash(prepared),
        "seed": str(cfg.seed),
        "dvc_exp": dvc_exp,
    }
    digest = tags["data_dvc_md5"] if tags["data_dvc_md5"] != "unknown" else tags["data_sha256"]
    splits = load_splits(prepared)
    meta = load_meta(prepared)
    k = len(splits["folds"])
    # Short: the runs table's Description column is as wide as its longest text.
    description = (
        f"{k}-fold CV, "
        + (f"`dvc exp` experiment `{dvc_exp}`" if dvc_exp else "`dvc repro` baseline")
        + f": lr {learning_rate:.3g}, batch {batch_size}, up to {cfg.epochs} epochs"
    )
    with mlflow.start_run(
        experiment_id=exp_id,
        run_name=f"cv-{dvc_exp}" if dvc_exp else "cv",
        tags=tags,
        description=description,
    ) as parent:
        params = as_flat_dict(cfg)
        params.update({"learning_rate": learning_rate, "batch_size": batch_size, "k_folds": k})
        params["hparams_source"] = hparams_source
        log_params_flat(params)
        mlflow.set_tags({"test_cases": ",".join(splits["test"]), "stage": "train"})
        log_dataset(prepared, digest, context="training")
        parent_id = parent.info.run_id
        job = FoldJob(
            prepared, cfg, learning_rate, batch_size, exp_id, parent_id, tags, params, digest, k
        )
        processes = processes_for(cfg.processes, k)
        mlflow.log_params(
            {
                "fold_processes": processes,
                "fold_threads": threads_per_process(processes) if processes > 1 else "default",
            }
        )
        outcomes: dict[int, FoldOutcome] = {}
        for fold in range(k):
            key = fold_key(tags["data_sha256"], params, fold, *fold_cases(splits, fold))
            reused = reuse_fold(exp_id, key, parent_id, load_model=cfg.final == "ensemble")
            if reused is not None:  # a finished fold of an interrupted train
                log.info(f"train: fold {fold}: reused finished run {reused.run_id}")
                outcomes[fold] = reused
        outcomes.update(run_folds(job, [f for f in range(k) if f not in outcomes], processes))
        fold_rows = [outcomes[f].row for f in range(k)]
        histories = {f"fold-{f}": outcomes[f].history for f in range(k)}

        summary: dict[str, Any] = {}
        for name in ("dice", "iou"):
            values = np.array([r[f"best_val_{name}"] for r in fold_rows])
            summary[f"cv_val_{name}_mean"] = float(values.mean())
            summary[f"cv_val_{name}_std"] = float(values.std())
        mlflow.log_metrics(headline_metrics(summary))
        mlflow.log_figure(curves_figure(histories), "curves.png")

        final_epochs = int(round(float(np.median([r["best_epoch"] for r in fold_rows]))))
        with mlflow.start_run(
            experiment_id=exp_id, run_name="final", nested=True, tags=tags
        ) as final_run:
            mlflow.set_tag("kind", "final")
            log_dataset(prepared, digest, context="training")
            trainval = trainval_cases(splits)
            if cfg.final == "ensemble":
                mlflow.set_tag(NOTE_TAG, f"Final model: mean of the {k} fold models")
                model = ensemble([outcomes[f].model for f in range(k)])
                mlflow.log_params({"final": "ensemble", "members": k})
            else:
                mlflow.set_tag(
                    NOTE_TAG, f"Final model: {len(trainval)} patients, {final_epochs} epochs"
                )
                mlflow.log_params({"final": "retrain", "epochs": final_epochs})
                mlflow.set_tag("train_cases", ",".join(trainval))
                t0 = time.perf_counter()
                model = fit(
                    load_prepared(prepared, trainval),
                    None,
                    cfg.spec,
                    learning_rate=learning_rate,
                    batch_size=batch_size,
                    epochs=final_epochs,
                    seed=cfg.seed + k,
                    distribute=cfg.distribute,
                    callbacks=[MlflowEpochLogger(final_run.info.run_id)],
                    progress="train: final",
                ).model
                mlflow.log_metric("train_seconds", time.perf_counter() - t0)
            log_keras_model(model)
        cost = {
            "model_gflops": count_flops(model, int(meta["image_size"])) / 1e9,
            "model_params": float(model.count_params()),
        }
        mlflow.log_metrics(cost)  # on the parent: the headline figures a user sorts by
    summary.update(cost)
    summary["final"] = cfg.final
    if cfg.final == "retrain":
        summary["final_epochs"] = final_epochs
    summary.update({"learning_rate": learning_rate, "batch_size": batch_size, "folds": fold_rows})
    return TrainOutputs(
        model=model,
        window=meta["window"],
        image_size=meta["image_size"],
        context_mm=float(meta.get("context_mm", 0.0)),
        crop=str(meta.get("crop", "none")),
        metrics=summary,
        curves=histories,
        run={
            "experiment_id": exp_id,
            "parent_run_id": parent_id,
            "final_run_id": final_run.info.run_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        },
    )
