"""The descriptions the registry shows: the registered model's, and a model card per version.

Plain Markdown (the MLflow UI renders it). A version's card says what a reader needs before
using it: the data version that trained it, its held-out test figures, the pre- and
post-processing it expects, the champion/challenger decision in words, and what it is not for.
"""

from __future__ import annotations

from typing import Any

MODEL_DESCRIPTION = (
    "2D U-Net liver segmentation of abdominal CT (liverseg). Input: CT slices or a NIfTI "
    "volume in HU; output: a 0/1 liver mask on the input's grid. The alias `@champion` is the "
    "version with the best held-out test Dice so far; a version that did not beat it is "
    "`@challenger`. Each version's description is its model card. Research and teaching use "
    "only: **not a medical device**, not for diagnosis or treatment."
)


def decision_text(
    decision: str, test_dice: float, before_version: str | None, before_dice: float | None
) -> str:
    """The champion/challenger decision as a sentence."""
    if before_version is None:
        return f"{decision}: the first version with a test Dice ({test_dice:.4f})."
    if before_dice is None:
        return f"{decision}: champion v{before_version} has no readable test Dice, so it is kept."
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
    """Markdown card of one registered version.

    ``test``: the evaluate stage's metrics (``dice_mean``, ``dice_std``, ``hd95_mm_mean``,
    ``n_patients``...); ``data``: ``dvc_md5`` and ``sha256`` of the prepared data; ``train``:
    the training parent run's ``run_id``, ``cv_val_dice_mean``, ``learning_rate``,
    ``batch_size``, ``dvc_exp`` and ``git_commit``.
    """
    window = preprocessing.get("window", ["?", "?"])

    def num(d: dict[str, Any], key: str, fmt: str) -> str:
        value = d.get(key)
        return format(value, fmt) if isinstance(value, int | float) else "?"

    return "\n".join(
        [
            f"Decision: {decision}",
            "",
            f"- **Test** ({test.get('n_patients', '?')} held-out patients, 3-D): Dice "
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
            f"- **Preprocessing**: RAS axial slices, HU window [{window[0]}, {window[1]}] "
            f"scaled to [0, 1], resized to {preprocessing.get('image_size', '?')} px",
            f"- **Post-processing**: threshold {post.get('threshold')}, largest 3-D component "
            f"{post.get('largest_component')}, fill holes {post.get('fill_holes')}",
            "- **Intended use**: research and teaching on abdominal CT like the training data. "
            "**Not a medical device**: not for diagnosis or treatment.",
        ]
    )
