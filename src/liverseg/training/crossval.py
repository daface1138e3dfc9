"""What the ``train`` stage does: patient-level k-fold cross-validation and the final model,
recorded in MLflow. :func:`train` sets up Keras and the MLflow experiment, cross-validates and
returns what the stage writes (the model folder, ``metrics.json``, ``curves.csv``, ``run.json``).

MLflow layout (one experiment): a parent run per call of :func:`cross_validate` holding all
params, the seed, git commit and data hash tags, and mean/std over folds; a child run per fold
(``fold-0`` ...) with per-epoch metrics, its case ids and its best weights as a Keras model;
and a child run ``final`` with the model that the later stages use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np

from liverseg.data.prepared import load_meta, load_prepared, load_splits
from liverseg.data.splits import fold_cases, trainval_cases
from liverseg.model.unet import count_flops
from liverseg.params import TrainParams, as_flat_dict
from liverseg.tracking import (
    NOTE_TAG,
    content_hash,
    dvc_experiment,
    dvc_out_hash,
    ensure_experiment,
    git_commit,
    headline_metrics,
    log_dataset,
    log_params_flat,
)
from liverseg.training import resume
from liverseg.training.curves import curves_figure
from liverseg.training.fit import FitResult, MlflowEpochLogger, fit, keras_session
from liverseg.training.folds import FoldJob, FoldOutcome, log_keras_model, run_folds
from liverseg.workers import processes_for, threads_per_process


@dataclass
class TrainResult:
    """What :func:`cross_validate` produced."""

    parent_run_id: str
    final_run_id: str
    final_model: keras.Model
    summary: dict[str, Any]
    histories: dict[str, dict[str, list[float]]]


def ensemble(models: list[keras.Model]) -> keras.Model:
    """One Keras model averaging the probabilities of ``models`` (the fold ensemble)."""
    inp = keras.Input(shape=(None, None, 1), name="image")
    # The fold models share one architecture and so one name; a functional model needs
    # unique names, so each member is re-wrapped (same layers and weights) under its own.
    members = [keras.Model(m.input, m.output, name=f"fold_{i}") for i, m in enumerate(models)]
    outs = [m(inp) for m in members]
    out = keras.layers.Average(name="mean_prob")(outs) if len(outs) > 1 else outs[0]
    return keras.Model(inp, out, name="fold_ensemble")


def cross_validate(
    prepared: Path,
    cfg: TrainParams,
    *,
    learning_rate: float,
    batch_size: int,
    experiment_id: str,
    tags: dict[str, str],
    extra_params: dict[str, Any] | None = None,
    data_digest: str = "",
    dvc_exp: str = "",
) -> TrainResult:
    """Train every fold, then the final model; every run ends FINISHED or FAILED.

    ``data_digest`` (the prepared data's DVC hash) is the digest of the dataset that every
    run records as its input; ``dvc_exp`` names the ``dvc exp run`` experiment, if any."""
    splits = load_splits(prepared)
    k = len(splits["folds"])
    histories: dict[str, dict[str, list[float]]] = {}
    fold_rows: list[dict[str, Any]] = []
    fold_models: list[keras.Model] = []
    m = cfg.model
    what = (
        f"U-Net depth {m.depth}, {m.base_filters} filters, loss {cfg.loss}, lr "
        f"{learning_rate:.3g}, batch {batch_size}, up to {cfg.epochs} epochs (patience "
        f"{cfg.patience}), seed {cfg.seed}"
    )
    # Short: the runs table's Description column is as wide as its longest text; the
    # details (model, data, test patients) are the run's params, tags and Dataset column.
    description = (
        f"{k}-fold CV, "
        + (f"`dvc exp` experiment `{dvc_exp}`" if dvc_exp else "`dvc repro` baseline")
        + f": lr {learning_rate:.3g}, batch {batch_size}, up to {cfg.epochs} epochs"
    )
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=f"cv-{dvc_exp}" if dvc_exp else "cv",
        tags=tags,
        description=description,
    ) as parent:
        params = as_flat_dict(cfg)
        params.update({"learning_rate": learning_rate, "batch_size": batch_size, "k_folds": k})
        params.update(extra_params or {})
        log_params_flat(params)
        mlflow.set_tags({"test_cases": ",".join(splits["test"]), "stage": "train"})
        log_dataset(prepared, data_digest, context="training")
        job = FoldJob(
            prepared=prepared,
            cfg=cfg,
            learning_rate=learning_rate,
            batch_size=batch_size,
            experiment_id=experiment_id,
            parent_run_id=parent.info.run_id,
            tags=tags,
            data_digest=data_digest,
            params=params,
            what=what,
            k=k,
        )
        processes = processes_for(cfg.processes, k)
        mlflow.log_params(
            {
                "fold_processes": processes,
                "fold_threads": threads_per_process(processes) if processes > 1 else "default",
            }
        )
        outcomes: dict[int, FoldOutcome] = {}
        pending: list[int] = []
        for fold in range(k):
            train_ids, val_ids = fold_cases(splits, fold)
            key = resume.fold_key(tags.get("data_sha256", ""), params, fold, train_ids, val_ids)
            reused = resume.reuse_fold(
                experiment_id, key, parent.info.run_id, load_model=cfg.final == "ensemble"
            )
            if reused is None:
                pending.append(fold)
                continue
            # a finished fold of an interrupted train
            print(f"train: fold {fold}: reused finished run {reused.run_id}", flush=True)
            outcomes[fold] = FoldOutcome(reused.run_id, reused.row, reused.history, reused.model)
        outcomes.update(run_folds(job, pending, processes))
        for fold in range(k):
            out = outcomes[fold]
            fold_rows.append(out.row)
            histories[f"fold-{fold}"] = out.history
            if cfg.final == "ensemble":
                fold_models.append(out.model)

        dice = np.array([r["best_val_dice"] for r in fold_rows])
        iou = np.array([r["best_val_iou"] for r in fold_rows])
        summary: dict[str, Any] = {
            "cv_val_dice_mean": float(dice.mean()),
            "cv_val_dice_std": float(dice.std()),
            "cv_val_iou_mean": float(iou.mean()),
            "cv_val_iou_std": float(iou.std()),
        }
        mlflow.log_metrics(headline_metrics(summary))
        mlflow.log_figure(curves_figure(histories), "curves.png")

        final_epochs = int(round(float(np.median([r["best_epoch"] for r in fold_rows]))))
        with mlflow.start_run(
            experiment_id=experiment_id, run_name="final", nested=True, tags=tags
        ) as final_run:
            mlflow.set_tag("kind", "final")
            log_dataset(prepared, data_digest, context="training")
            trainval = trainval_cases(splits)
            if cfg.final == "ensemble":
                mlflow.set_tag(NOTE_TAG, f"Final model: mean of the {k} fold models")
                model = ensemble(fold_models)
                mlflow.log_params({"final": "ensemble", "members": k})
                final_hist: dict[str, list[float]] = {}
            else:
                mlflow.set_tag(
                    NOTE_TAG,
                    f"Final model: {len(trainval)} patients, {final_epochs} epochs",
                )
                mlflow.log_params({"final": "retrain", "epochs": final_epochs})
                mlflow.set_tag("train_cases", ",".join(trainval))
                t0 = time.perf_counter()
                res_final: FitResult = fit(
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
                )
                model = res_final.model
                final_hist = res_final.history
                mlflow.log_metric("train_seconds", time.perf_counter() - t0)
            log_keras_model(model)
        image_size = int(load_meta(prepared)["image_size"])
        cost = {
            "model_gflops": count_flops(model, image_size) / 1e9,
            "model_params": float(model.count_params()),
        }
        mlflow.log_metrics(cost)  # on the parent: the headline figures a user sorts by
        summary.update(cost)
        histories["final"] = final_hist
        summary["final"] = cfg.final
        if cfg.final == "retrain":
            summary["final_epochs"] = final_epochs
        summary["folds"] = fold_rows
        return TrainResult(
            parent_run_id=parent.info.run_id,
            final_run_id=final_run.info.run_id,
            final_model=model,
            summary=summary,
            histories=histories,
        )


@dataclass
class TrainOutputs:
    """The final model with the preprocessing it expects, and the stage's reports."""

    model: keras.Model
    window: list[float]  # the prepare stage's HU window, [low, high]
    image_size: int
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
    """Cross-validate ``cfg``'s model on the prepared data ``prepared`` with the given learning
    rate and batch size (``hparams_source`` says where they came from, logged as a param) and
    build the final model, in experiment ``cfg.experiment`` of the current tracking URI."""
    keras_session(cfg.precision, cfg.seed)
    exp_id = ensure_experiment(cfg.experiment)
    tags = {
        "git_commit": git_commit(),
        "data_dvc_md5": dvc_out_hash(prepared),
        "data_sha256": content_hash(prepared),
        "seed": str(cfg.seed),
        "dvc_exp": dvc_experiment(),
    }
    digest = tags["data_dvc_md5"] if tags["data_dvc_md5"] != "unknown" else tags["data_sha256"]
    result = cross_validate(
        prepared,
        cfg,
        learning_rate=learning_rate,
        batch_size=batch_size,
        experiment_id=exp_id,
        tags=tags,
        extra_params={"hparams_source": hparams_source},
        data_digest=digest,
        dvc_exp=tags["dvc_exp"],
    )
    meta = load_meta(prepared)
    metrics: dict[str, Any] = {k: v for k, v in result.summary.items() if k not in ("folds",)}
    metrics.update(
        {"learning_rate": learning_rate, "batch_size": batch_size, "folds": result.summary["folds"]}
    )
    return TrainOutputs(
        model=result.final_model,
        window=meta["window"],
        image_size=meta["image_size"],
        metrics=metrics,
        curves={k: v for k, v in result.histories.items() if k.startswith("fold")},
        run={
            "experiment_id": exp_id,
            "parent_run_id": result.parent_run_id,
            "final_run_id": result.final_run_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        },
    )
