"""The model folder (the train stage's ``models/``): one writer, one reader.

It holds ``model.keras`` (custom objects from :mod:`liverseg.model.keras_metrics`) and
``preprocessing.json``: ``{"window": [low, high], "image_size": n, "context_mm": d, "crop": c}``,
the HU window, the slice size the network was trained on, how far its neighbour channels sit
(0: one channel; missing in folders written before it, which are 2-D) and the in-plane crop
(``body``: the body's square, ``none``: the whole image, as in folders written before it).
Apart from ``inference.py`` so that the train stage, which writes it, does not depend on the
inference code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from liverseg.errors import DataError
from liverseg.fsutil import atomic_dir, read_stage_json, write_json

MODEL_FILE = "model.keras"
PREPROCESSING_FILE = "preprocessing.json"
POSTPROCESSING_FILE = "postprocessing.json"  # a registered model's (liverseg.serving.model)


def save_model_dir(
    folder: Path,
    model: Any,
    window: Sequence[float],
    image_size: int,
    context_mm: float = 0.0,
    crop: str = "none",
) -> Path:
    """Write ``folder`` atomically: it appears whole or is left as it was."""
    prep = {"window": list(window), "image_size": image_size, "context_mm": context_mm}
    prep["crop"] = crop
    with atomic_dir(Path(folder)) as tmp:
        model.save(tmp / MODEL_FILE)
        write_json(tmp / PREPROCESSING_FILE, prep)
    return Path(folder)


def check_model_dir(folder: Path) -> tuple[Path, Path]:
    """``(model file, preprocessing file)`` of a model folder (or of the model file in one),
    or a DataError naming the path and what is missing."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: not found (expected a train stage model folder)")
    model_file = folder / MODEL_FILE if folder.is_dir() else folder
    prep_file = model_file.parent / PREPROCESSING_FILE
    missing = [f.name for f in (model_file, prep_file) if not f.is_file()]
    if missing:
        raise DataError(
            f"{model_file.parent}: no {' and no '.join(missing)} (expected a train stage model "
            "folder)"
        )
    return model_file, prep_file


def load_model_dir(folder: Path) -> tuple[Any, tuple[float, float], int, float, str]:
    """``(keras model, window_hu, image_size, context_mm, crop)`` of a model folder (or of its model
    file); a missing or broken folder is a DataError naming the path."""
    model_file, prep_file = check_model_dir(folder)
    prep = read_stage_json(prep_file, "train")
    try:
        low, high = prep["window"]
        window_hu, image_size = (float(low), float(high)), int(prep["image_size"])
        context_mm = float(prep.get("context_mm", 0.0))
        crop = str(prep.get("crop", "none"))
        if crop not in ("none", "body"):
            raise ValueError(f"crop {crop!r} is not 'none' or 'body'")
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{prep_file}: not a {PREPROCESSING_FILE} of the train stage ({exc})"
        ) from exc
    # Imported after the checks: a wrong path fails at once, without TensorFlow's start.
    import keras

    from liverseg.model.keras_metrics import CUSTOM_OBJECTS

    try:
        model = keras.models.load_model(model_file, custom_objects=CUSTOM_OBJECTS, compile=False)
    except Exception as exc:  # Keras raises many types for a file that is not a model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{model_file}: not a loadable Keras model ({first})") from exc
    return model, window_hu, image_size, context_mm, crop
