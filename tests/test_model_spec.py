"""The model spec that ``fit`` trains: the train section's fields that the tune stage hashes
into its study's name and lists as its DVC params, and nothing else."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import yaml

from liverseg.params import AugmentParams, ModelParams, ModelSpec, TrainParams, TuneParams
from liverseg.training.fit import compile_unet
from liverseg.tuning.study import study_inputs, study_name

REPO = Path(__file__).resolve().parents[1]
SPEC_FIELDS = [f.name for f in dataclasses.fields(ModelSpec)]


def test_spec_is_the_train_fields_that_the_study_hashes_and_dvc_lists() -> None:
    hashed = study_inputs("0" * 64, TuneParams(), TrainParams())["train"]
    assert sorted(hashed) == sorted(SPEC_FIELDS)
    listed = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["tune"]["params"]
    assert {f"train.{name}" for name in SPEC_FIELDS} <= set(listed)


def test_train_params_spec_carries_the_section_values() -> None:
    cfg = TrainParams(
        model=ModelParams(depth=3, base_filters=8),
        loss="dice",
        augment=AugmentParams(flip=True),
        precision="mixed_bfloat16",
        learning_rate=0.5,
    )
    assert cfg.spec == ModelSpec(
        ModelParams(depth=3, base_filters=8), "dice", AugmentParams(flip=True), "mixed_bfloat16"
    )
    # the fields fit does not use are not part of it
    assert not hasattr(cfg.spec, "learning_rate")


def test_study_name_is_unchanged() -> None:
    """An existing study is resumed only if its name stays: pinned for the default params
    (the value before the spec existed)."""
    assert study_name("0" * 64, TuneParams(), TrainParams()) == "liverseg-e61dc76cace2"


def test_a_validation_stride_makes_another_study() -> None:
    """A trial's value depends on which validation slices each epoch sees."""
    names = {study_name("0" * 64, TuneParams(), TrainParams(val_stride=k)) for k in (1, 2, 3)}
    assert len(names) == 3
    listed = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["tune"]["params"]
    assert "train.val_stride" in listed


def test_the_model_takes_the_spec_precision_and_leaves_the_global_policy() -> None:
    before = keras.mixed_precision.global_policy().name
    spec = ModelSpec(model=ModelParams(depth=1, base_filters=2), precision="mixed_bfloat16")
    model = compile_unet(16, spec, 1e-3, seed=0)
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert conv.dtype_policy.name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == before
    plain = compile_unet(16, dataclasses.replace(spec, precision="float32"), 1e-3, seed=0)
    conv = next(layer for layer in plain.layers if isinstance(layer, keras.layers.Conv2D))
    assert conv.dtype_policy.name == "float32"
