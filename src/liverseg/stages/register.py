"""`register` stage: log the model as an MLflow pyfunc, register it, move the aliases.

The new version takes the alias ``champion`` only when its held-out test Dice (the evaluate
stage's ``dice_mean``) is at least the current champion's, read from that version's
``test_dice`` tag; otherwise it takes ``challenger``. A champion without a readable
``test_dice`` tag (e.g. set by hand) is kept: its quality is unknown, so no number can beat it.
Registry stages are not used (deprecated in MLflow); aliases only.

Tags on the new version: ``test_dice``, ``champion_dice_before`` (``none`` when there was no
champion, ``unknown`` when its tag was unreadable), ``champion_version_before``, ``decision``,
``source_run_id`` (the register run that logged it), ``train_parent_run_id``, ``git_commit``.

Writes ``reports/register/register.json``. The register run is nested (by the
``mlflow.parentRunId`` tag) under the training parent run named in ``reports/train/run.json``
and ends FAILED, not RUNNING, if anything goes wrong. Works against whatever store
``MLFLOW_TRACKING_URI`` names (the CLI defaults it to the local SQLite store).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from liverseg.errors import DataError
from liverseg.fsutil import atomic_dir, read_stage_json, write_json
from liverseg.inference import MODEL_FILE, PREPROCESSING_FILE, PostProcessing
from liverseg.model_card import MODEL_DESCRIPTION, decision_text, model_card
from liverseg.params import EvaluateParams, RegisterParams, load_section

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

CHAMPION = "champion"
CHALLENGER = "challenger"
DICE_TAG = "test_dice"
NO_CHAMPION = "none"
UNKNOWN_DICE = "unknown"


def read_test_dice(path: Path) -> float:
    """``dice_mean`` of the evaluate stage's ``metrics.json``, a number in [0, 1]."""
    path = Path(path)
    data = read_stage_json(path, "evaluate")
    value = data.get("dice_mean") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{path}: dice_mean: missing or not a number (got {value!r})")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise DataError(f"{path}: dice_mean: must be in [0, 1], got {value!r}")
    return float(value)


def read_train_run(path: Path) -> dict[str, str]:
    """The train stage's ``run.json``; ``parent_run_id`` is required."""
    path = Path(path)
    data = read_stage_json(path, "train")
    if not isinstance(data, dict) or not isinstance(data.get("parent_run_id"), str):
        raise DataError(f"{path}: parent_run_id: missing (not a train stage run.json)")
    if not data["parent_run_id"]:
        raise DataError(f"{path}: parent_run_id: empty")
    return {k: str(v) for k, v in data.items() if v is not None}


def decide(new_dice: float, champion_dice: float | None, has_champion: bool) -> str:
    """``champion`` or ``challenger`` for a new version (the rule in the module docstring)."""
    if not has_champion:
        return CHAMPION
    if champion_dice is None:
        return CHALLENGER
    return CHAMPION if new_dice >= champion_dice else CHALLENGER


def current_champion(client: MlflowClient, name: str) -> tuple[str | None, float | None]:
    """(version, test Dice) of the version holding ``champion`` now; Nones if there is none,
    Dice None if its tag is missing or not a number."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, None
        raise
    version = (model.aliases or {}).get(CHAMPION)
    if version is None:
        return None, None
    tag = client.get_model_version(name, str(version)).tags.get(DICE_TAG)
    try:
        dice = float(tag) if tag is not None else None
    except ValueError:
        dice = None
    if dice is not None and not math.isfinite(dice):
        dice = None
    return str(version), dice


def register(
    model_dir: Path,
    evaluate_metrics: Path,
    train_run: Path,
    out: Path,
    cfg: RegisterParams,
    post: PostProcessing,
) -> dict[str, Any]:
    """Log, register and alias the model; write ``out/register.json`` and return its content."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from liverseg.serving import log_pyfunc
    from liverseg.training.tracking import NOTE_TAG, git_commit

    for f in (Path(model_dir) / MODEL_FILE, Path(model_dir) / PREPROCESSING_FILE):
        if not f.is_file():
            raise DataError(f"{f}: not found (run the train stage first)")
    test_dice = read_test_dice(evaluate_metrics)
    link = read_train_run(train_run)
    client = MlflowClient()
    tracking_uri = mlflow.get_tracking_uri()
    try:
        parent = client.get_run(link["parent_run_id"])
    except MlflowException as exc:
        raise DataError(
            f"{train_run}: parent_run_id {link['parent_run_id']} is not a run of the tracking "
            f"store {tracking_uri} (run.json was written against "
            f"{link.get('tracking_uri', 'an unknown store')}; set MLFLOW_TRACKING_URI)"
        ) from exc

    name = cfg.model_name
    commit = git_commit()
    run_tags = {
        "mlflow.parentRunId": link["parent_run_id"],
        "kind": "register",
        "git_commit": commit,
        "train_final_run_id": link.get("final_run_id", ""),
    }
    with mlflow.start_run(
        experiment_id=parent.info.experiment_id, run_name="register", tags=run_tags
    ) as run:
        run_id = str(run.info.run_id)
        mlflow.log_params(
            {
                "model_name": name,
                "threshold": post.threshold,
                "largest_component": post.largest_component,
                "fill_holes": post.fill_holes,
            }
        )
        mlflow.log_metric(DICE_TAG, test_dice)
        before_version, before_dice = current_champion(client, name)
        info = log_pyfunc(Path(model_dir), post, name="model", registered_model_name=name)
        version = str(info.registered_model_version)
        decision = decide(test_dice, before_dice, before_version is not None)
        if before_version is None:
            dice_before = NO_CHAMPION
        else:
            dice_before = UNKNOWN_DICE if before_dice is None else repr(before_dice)
        version_tags = {
            DICE_TAG: repr(test_dice),
            "champion_dice_before": dice_before,
            "champion_version_before": before_version or NO_CHAMPION,
            "decision": decision,
            "source_run_id": run_id,
            "train_parent_run_id": link["parent_run_id"],
            "git_commit": commit,
        }
        # Tags first: an alias must never point at a version without its test Dice.
        for key, value in version_tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, decision, version)
        card = _model_card(
            Path(model_dir),
            evaluate_metrics,
            parent,
            post,
            decision_text(decision, test_dice, before_version, before_dice),
        )
        client.update_model_version(name, version, description=card)
        client.update_registered_model(name, description=MODEL_DESCRIPTION)
        aliases = sorted(client.get_model_version(name, version).aliases)
        mlflow.set_tags(
            {
                "registered_model": name,
                "model_version": version,
                "decision": decision,
                NOTE_TAG: f"Registered `{name}` v{version}. {card}",
            }
        )
        result: dict[str, Any] = {
            "name": name,
            "version": version,
            "aliases": aliases,
            "decision": decision,
            "metrics": {
                "test_dice": test_dice,
                "champion_dice_before": before_dice,
                "champion_version_before": before_version,
            },
            "source_run_id": run_id,
            "train_parent_run_id": link["parent_run_id"],
            "model_uri": f"models:/{name}/{version}",
            "alias_uri": f"models:/{name}@{decision}",
            "logged_model_uri": info.model_uri,
            "tracking_uri": tracking_uri,
        }
        with atomic_dir(Path(out)) as tmp:
            write_json(tmp / "register.json", result)
    return result


def _model_card(
    model_dir: Path, evaluate_metrics: Path, parent: Run, post: PostProcessing, decision: str
) -> str:
    """The version's model card from the stage inputs and the training parent run."""
    test = read_stage_json(Path(evaluate_metrics), "evaluate")
    pre = read_stage_json(model_dir / PREPROCESSING_FILE, "train")
    tags, metrics, params = parent.data.tags, parent.data.metrics, parent.data.params
    return model_card(
        decision=decision,
        test=test if isinstance(test, dict) else {},
        data={"dvc_md5": tags.get("data_dvc_md5", "?"), "sha256": tags.get("data_sha256", "?")},
        preprocessing=pre if isinstance(pre, dict) else {},
        post=dataclasses.asdict(post),
        train={
            "run_id": parent.info.run_id,
            "cv_val_dice_mean": metrics.get("cv_val_dice_mean"),
            "learning_rate": float(params.get("learning_rate", "nan")),
            "batch_size": params.get("batch_size", "?"),
            "dvc_exp": tags.get("dvc_exp", ""),
            "git_commit": tags.get("git_commit", "?"),
        },
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, required=True, help="train's models/")
    parser.add_argument(
        "--evaluate", type=Path, required=True, help="evaluate's metrics.json (dice_mean)"
    )
    parser.add_argument("--train-run", type=Path, required=True, help="train's run.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))


def main(args: argparse.Namespace) -> None:
    cfg: RegisterParams = load_section("register", args.params)
    # The served model must post-process as the evaluated one did, or test_dice would not be
    # its Dice: the evaluate section's settings are logged with it.
    ev: EvaluateParams = load_section("evaluate", args.params)
    post = PostProcessing(ev.threshold, ev.largest_component, ev.fill_holes)
    result = register(args.model_dir, args.evaluate, args.train_run, args.out, cfg, post)
    before = result["metrics"]["champion_dice_before"]
    versus = (
        "no previous champion"
        if result["metrics"]["champion_version_before"] is None
        else (
            f"champion v{result['metrics']['champion_version_before']} had "
            + ("an unknown Dice" if before is None else f"{before:.4f}")
        )
    )
    print(
        f"register: {result['name']} v{result['version']} (test Dice "
        f"{result['metrics']['test_dice']:.4f}; {versus}) -> {result['decision']}; "
        f"serve with: mlflow models serve -m {result['alias_uri']} --env-manager local"
    )
