"""The MLflow Model Registry side of the project: the champion policy and one registration.

Policy: a new version takes the alias ``champion`` only when its held-out test Dice (the
evaluate stage's ``dice_mean``) is at least the current champion's, read from that version's
``test_dice`` tag; otherwise it takes ``challenger``. A champion without a readable
``test_dice`` tag (e.g. set by hand) is kept: its quality is unknown, so no number can beat it.
Registry stages are not used (deprecated in MLflow); aliases only.

Tags on the new version: ``test_dice``, ``champion_dice_before`` (``none`` when there was no
champion, ``unknown`` when its tag was unreadable), ``champion_version_before``, ``decision``,
``source_run_id`` (the register run that logged it), ``train_parent_run_id``, ``git_commit``.

The register run is nested (by the ``mlflow.parentRunId`` tag) under the training parent run
and ends FAILED, not RUNNING, if anything goes wrong. Works against whatever store the caller
set (the CLI defaults it to the local SQLite store); MLflow is imported only when used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from liverseg.errors import DataError
from liverseg.fsutil import read_stage_json
from liverseg.inference import PostProcessing
from liverseg.model_card import MODEL_DESCRIPTION, decision_text, model_card
from liverseg.model_dir import check_model_dir

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

CHAMPION = "champion"
CHALLENGER = "challenger"
DICE_TAG = "test_dice"
NO_CHAMPION = "none"
UNKNOWN_DICE = "unknown"


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


def register_model(
    model_dir: Path,
    *,
    name: str,
    test: dict[str, Any],
    train_link: dict[str, str],
    post: PostProcessing,
    link_file: Path | str = "run.json",
) -> dict[str, Any]:
    """Log ``model_dir`` as a pyfunc, register it as ``name`` and move the aliases.

    ``test``: the evaluate stage's metrics (``dice_mean`` a number in [0, 1]); ``train_link``:
    the train stage's run link (``parent_run_id``, ``final_run_id``, ``tracking_uri``);
    ``post``: the post-processing the model was evaluated with, logged with it; ``link_file``
    names the link in errors. Returns what the register stage writes to ``register.json``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from liverseg.serving import log_pyfunc
    from liverseg.tracking import NOTE_TAG, follow_moved_store, git_commit

    _, prep_file = check_model_dir(Path(model_dir))
    follow_moved_store()
    test_dice = float(test["dice_mean"])
    client = MlflowClient()
    tracking_uri = mlflow.get_tracking_uri()
    parent_id = train_link["parent_run_id"]
    try:
        parent = client.get_run(parent_id)
    except MlflowException as exc:
        raise DataError(
            f"{link_file}: parent_run_id {parent_id} is not a run of the tracking store "
            f"{tracking_uri} (run.json was written against "
            f"{train_link.get('tracking_uri', 'an unknown store')}; set MLFLOW_TRACKING_URI)"
        ) from exc

    commit = git_commit()
    run_tags = {
        "mlflow.parentRunId": parent_id,
        "kind": "register",
        "git_commit": commit,
        "train_final_run_id": train_link.get("final_run_id", ""),
    }
    with mlflow.start_run(
        experiment_id=parent.info.experiment_id, run_name="register", tags=run_tags
    ) as run:
        run_id = str(run.info.run_id)
        mlflow.log_params({"model_name": name, **post.to_dict()})
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
            "train_parent_run_id": parent_id,
            "git_commit": commit,
        }
        # Tags first: an alias must never point at a version without its test Dice.
        for key, value in version_tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, decision, version)
        card = _model_card(
            test,
            read_stage_json(prep_file, "train"),
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
                NOTE_TAG: f"`{name}` v{version}: {decision}",
            }
        )
    return {
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
        "train_parent_run_id": parent_id,
        "model_uri": f"models:/{name}/{version}",
        "alias_uri": f"models:/{name}@{decision}",
        "logged_model_uri": info.model_uri,
        "tracking_uri": tracking_uri,
    }


def _model_card(
    test: dict[str, Any], pre: Any, parent: Run, post: PostProcessing, decision: str
) -> str:
    """The version's model card from the stage inputs and the training parent run."""
    tags, metrics, params = parent.data.tags, parent.data.metrics, parent.data.params
    return model_card(
        decision=decision,
        test=test,
        data={"dvc_md5": tags.get("data_dvc_md5", "?"), "sha256": tags.get("data_sha256", "?")},
        preprocessing=pre if isinstance(pre, dict) else {},
        post=post.to_dict(),
        train={
            "run_id": parent.info.run_id,
            "cv_val_dice_mean": metrics.get("cv_val_dice_mean"),
            "learning_rate": float(params.get("learning_rate", "nan")),
            "batch_size": params.get("batch_size", "?"),
            "dvc_exp": tags.get("dvc_exp", ""),
            "git_commit": tags.get("git_commit", "?"),
        },
    )
