"""The Model Registry side of ``register``: the champion policy, one registration, the model card.

A new version takes the alias ``champion`` when its held-out test Dice (evaluate's
``dice_mean``) is at least the ``test_dice`` tag of the version holding it, else
``challenger``; a champion without a readable tag is kept (no number can beat an unknown
quality), and so is one tested on other patients (its ``test_cases`` tag, the training run's:
two test sets' Dice do not compare). Aliases only, no registry stages. The register run is
nested under the training parent run and ends FAILED, not RUNNING, if anything goes wrong.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from liverseg.errors import DataError
from liverseg.fsutil import read_stage_json
from liverseg.inference import PostProcessing
from liverseg.model.folder import check_model_dir

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
DICE_TAG = "test_dice"
CASES_TAG = "test_cases"  # the test patients, comma-separated (train's parent run tag)
NO_CHAMPION = "none"
UNKNOWN_DICE = "unknown"
MODEL_DESCRIPTION = (
    "2D U-Net liver segmentation of abdominal CT (liverseg). Input: CT slices or a NIfTI "
    "volume in HU; output: a 0/1 liver mask on the input's grid. The alias `@champion` is the "
    "version with the best held-out test Dice so far; a version that did not beat it is "
    "`@challenger`. Each version's description is its model card. Research and teaching use "
    "only: **not a medical device**, not for diagnosis or treatment."
)


def decide(
    new_dice: float, champion_dice: float | None, has_champion: bool, same_test: bool = True
) -> str:
    """``champion`` or ``challenger`` for a new version (the rule in the module docstring)."""
    if not has_champion:
        return CHAMPION
    if champion_dice is None or not same_test:
        return CHALLENGER
    return CHAMPION if new_dice >= champion_dice else CHALLENGER


def current_champion(client: MlflowClient, name: str) -> tuple[str | None, float | None, str]:
    """(version, test Dice, test cases) of the version holding ``champion`` now; Nones (and
    "") if there is none, Dice None if its tag is missing or not a number."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, None, ""
        raise
    version = (model.aliases or {}).get(CHAMPION)
    if version is None:
        return None, None, ""
    tags = client.get_model_version(name, str(version)).tags
    try:
        dice: float | None = float(tags[DICE_TAG])
    except (KeyError, ValueError):
        dice = None
    dice = dice if dice is not None and math.isfinite(dice) else None
    return str(version), dice, tags.get(CASES_TAG, "")


def register_model(
    model_dir: Path,
    *,
    name: str,
    test: dict[str, Any],
    train_link: dict[str, str],
    post: PostProcessing,
    link_file: Path | str = "run.json",
) -> dict[str, Any]:
    """Log ``model_dir`` as a pyfunc with ``post`` (the evaluated post-processing), register it
    as ``name`` and move the aliases by ``test["dice_mean"]``, nested under the run of
    ``train_link`` (train's run.json, ``link_file`` in errors); returns ``register.json``."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from liverseg.serving.model import log_pyfunc
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
        before_version, before_dice, before_cases = current_champion(client, name)
        cases = parent.data.tags.get(CASES_TAG, "")
        same_test = before_version is None or before_cases == cases
        info = log_pyfunc(Path(model_dir), post, registered_model_name=name)
        version = str(info.registered_model_version)
        decision = decide(test_dice, before_dice, before_version is not None, same_test)
        dice_before = UNKNOWN_DICE if before_dice is None else repr(before_dice)
        version_tags = {
            DICE_TAG: repr(test_dice),
            CASES_TAG: cases,
            "champion_dice_before": dice_before if before_version else NO_CHAMPION,
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
        tags, metrics, params = parent.data.tags, parent.data.metrics, parent.data.params
        pre = read_stage_json(prep_file, "train")
        card = model_card(
            decision=decision_text(
                decision,
                test_dice,
                before_version,
                before_dice,
                None if same_test else before_cases,
            ),
            test=test,
            data={"dvc_md5": tags.get("data_dvc_md5", "?"), "sha256": tags.get("data_sha256", "?")},
            preprocessing=pre if isinstance(pre, dict) else {},
            post=post.to_dict(),
            train={
                "run_id": parent_id,
                "cv_val_dice_mean": metrics.get("cv_val_dice_mean"),
                "learning_rate": float(params.get("learning_rate", "nan")),
                "batch_size": params.get("batch_size", "?"),
                "dvc_exp": tags.get("dvc_exp", ""),
                "git_commit": tags.get("git_commit", "?"),
            },
        )
        client.update_model_version(name, version, description=card)
        client.update_registered_model(name, description=MODEL_DESCRIPTION)
        aliases = sorted(client.get_model_version(name, version).aliases)
        note = {NOTE_TAG: f"`{name}` v{version}: {decision}"}
        mlflow.set_tags(
            dict(registered_model=name, model_version=version, decision=decision, **note)
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


def decision_text(
    decision: str,
    test_dice: float,
    before_version: str | None,
    before_dice: float | None,
    other_cases: str | None = None,
) -> str:
    """The champion/challenger decision as a sentence; ``other_cases``: the champion's test
    patients when they are not this version's."""
    if before_version is None:
        return f"{decision}: the first version with a test Dice ({test_dice:.4f})."
    if before_dice is None:
        return f"{decision}: champion v{before_version} has no readable test Dice, so it is kept."
    if other_cases is not None:
        return (
            f"{decision}: champion v{before_version} was tested on other patients "
            f"({other_cases or 'not recorded'}), so the test Dice ({test_dice:.4f} against "
            f"{before_dice:.4f}) do not compare and it is kept; promote this version by hand "
            "if it should serve."
        )
    op = ">=" if test_dice >= before_dice else "<"
    return (
        f"{decision}: test Dice {test_dice:.4f} {op} champion v{before_version}'s "
        f"{before_dice:.4f}."
    )


def model_card(
    *,
    decision: str,
    test: dict[str, Any],
    data: dict[str, str],
    preprocessing: dict[str, Any],
    post: dict[str, Any],
    train: dict[str, Any],
) -> str:
    """The Markdown card of one version (the MLflow UI renders it): ``test`` is evaluate's
    metrics, ``data`` the prepared data's hashes, ``train`` the training parent run's figures;
    a missing figure shows as ``?``."""
    window = preprocessing.get("window", ["?", "?"])

    def num(d: dict[str, Any], key: str, fmt: str) -> str:
        value = d.get(key)
        return format(value, fmt) if isinstance(value, int | float) else "?"

    return "\n".join(
        [
            f"Decision: {decision}",
            "",
            f"- **Test** ({test.get('n_scans', test.get('n_patients', '?'))} scans of "
            f"{test.get('n_patients', '?')} held-out patients, 3-D): Dice "
            f"{num(test, 'dice_mean', '.4f')} ± {num(test, 'dice_std', '.4f')}, HD95 "
            f"{num(test, 'hd95_mm_mean', '.1f')} mm, ASSD {num(test, 'assd_mm_mean', '.2f')} mm",
            f"- **Cross-validation** Dice {num(train, 'cv_val_dice_mean', '.4f')}; lr "
            f"{num(train, 'learning_rate', '.3g')}, batch {train.get('batch_size', '?')}",
            f"- **Data**: `data/prepared` DVC {data.get('dvc_md5', '?')} (SHA-256 "
            f"{str(data.get('sha256', '?'))[:12]}...)",
            f"- **Trained by** run `{train.get('run_id', '?')}` (git "
            f"{str(train.get('git_commit', '?'))[:12]}"
            + (f", dvc exp `{train['dvc_exp']}`" if train.get("dvc_exp") else "")
            + ")",
            "- **Preprocessing**: RAS axial slices"
            + (", cut to the body's square" if preprocessing.get("crop") == "body" else "")
            + f", HU window [{window[0]}, {window[1]}] "
            f"scaled to [0, 1], resized to {preprocessing.get('image_size', '?')} px"
            + (
                f", with the slices {preprocessing['context_mm']} mm below and above as channels"
                if preprocessing.get("context_mm")
                else ""
            ),
            f"- **Post-processing**: threshold {post.get('threshold')}, largest 3-D component "
            f"{post.get('largest_component')}, fill holes {post.get('fill_holes')}",
            "- **Intended use**: research and teaching on abdominal CT like the training data. "
            "**Not a medical device**: not for diagnosis or treatment.",
        ]
    )
