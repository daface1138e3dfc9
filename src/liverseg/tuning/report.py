"""The study's report: its best trial and trial counts (``best_params.json``) and its plots,
also on the study's MLflow run."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from liverseg.fsutil import atomic_dir
from liverseg.tuning.best_params import PARAM_BATCH, PARAM_LR, write_best_params
from liverseg.tuning.study import TuningError, count_trials


def summarize(study: optuna.Study) -> dict[str, Any]:
    """The best trial and the trial counts: the content of ``best_params.json``."""
    counts = count_trials(study)
    if counts[TrialState.COMPLETE.name] == 0:
        raise TuningError(
            f"study {study.study_name}: no trial completed ({counts['PRUNED']} pruned, "
            f"{counts['FAIL']} failed, {counts['RUNNING']} running); raise tune.n_trials or "
            "tune.timeout_s, or check the failed trials' MLflow runs"
        )
    best = study.best_trial
    assert best.value is not None
    return {
        PARAM_LR: float(best.params[PARAM_LR]),
        PARAM_BATCH: int(best.params[PARAM_BATCH]),
        "trial_number": best.number,
        "value": float(best.value),
        "study_name": study.study_name,
        "n_complete": counts[TrialState.COMPLETE.name],
        "n_pruned": counts[TrialState.PRUNED.name],
        "n_failed": counts[TrialState.FAIL.name],
    }


def write_plots(study: optuna.Study, out: Path, seed: int) -> dict[str, str]:
    """Study plots as PNG in ``out``; returns ``{file: "ok" | reason it was skipped}``. A plot
    that Optuna cannot draw is skipped, not fatal: the best parameters matter more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    distinct = {p: {t.params.get(p) for t in complete} for p in (PARAM_LR, PARAM_BATCH)}
    both = [PARAM_LR, PARAM_BATCH]
    plots: dict[str, tuple[Callable[[], Any], str | None]] = {
        "optimization_history.png": (lambda: vis.plot_optimization_history(study), None),
        "param_importances.png": (
            lambda: vis.plot_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)
            ),
            None if len(complete) >= 2 else "needs >= 2 complete trials",
        ),
        "slice.png": (lambda: vis.plot_slice(study, params=both), None),
        "contour.png": (
            lambda: vis.plot_contour(study, params=both),
            None
            if all(len(v) >= 2 for v in distinct.values())
            else "needs >= 2 distinct values of each parameter",
        ),
    }
    status: dict[str, str] = {}
    for name, (draw, skip) in plots.items():
        if skip is not None:
            status[name] = skip
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
                axes = list(ax.flat) if isinstance(ax, np.ndarray) else [ax]
                # Optuna draws a panel per parameter plus a colour bar in a default-size
                # figure; widen it so the bar does not cover the last panel.
                axes[0].figure.set_size_inches(max(6.4, 4.8 * len(axes)), 4.8)
                axes[0].figure.savefig(out / name, dpi=100, bbox_inches="tight")
                plt.close(axes[0].figure)
            status[name] = "ok"
        except Exception as exc:  # plotting is best effort, see the docstring
            status[name] = f"failed: {type(exc).__name__}: {exc}"
    return status


def write_report(
    study: optuna.Study, out: Path, seed: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """Write ``out/best_params.json`` and the plots atomically; returns (summary, plots)."""
    summary = summarize(study)
    with atomic_dir(Path(out)) as tmp:
        write_best_params(tmp, summary)
        plots = write_plots(study, tmp, seed)
    return summary, plots


def log_best(summary: dict[str, Any]) -> None:
    """The study's best trial and counts on the active (parent) MLflow run."""
    import mlflow

    params = {"learning_rate", "batch_size", "trial_number"}
    mlflow.log_params({f"best_{k}": summary[k] for k in sorted(params)})
    metrics = ("n_complete", "n_pruned", "n_failed")
    mlflow.log_metrics({"best_value": summary["value"], **{k: summary[k] for k in metrics}})


def log_plot_images(folder: Path) -> None:
    """The study's PNG plots as MLflow images of the active run (for its chart view)."""
    import mlflow
    from PIL import Image

    for png in sorted(folder.glob("*.png")):
        with Image.open(png) as im:
            # synchronous: see liverseg.evaluation.holdout.log_to_mlflow
            mlflow.log_image(im.convert("RGB"), key=f"study_{png.stem}", step=0, synchronous=True)
