"""The training loop: one execution per epoch, progress lines, MLflow epochs counted from 1."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from liverseg.params import ModelParams, ModelSpec, load_section
from liverseg.training import fit as fit_module
from liverseg.training.fit import MlflowEpochLogger, fit

REPO = Path(__file__).resolve().parents[1]
TINY = ModelSpec(model=ModelParams(depth=2, base_filters=4))


def _arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 16x16 slices with a bright square (the 'liver') at a random place."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.3, (n, 16, 16, 1)).astype(np.float32)
    masks = np.zeros_like(images)
    for i in range(n):
        y, x = rng.integers(2, 9, size=2)
        images[i, y : y + 6, x : x + 6] += 0.6
        masks[i, y : y + 6, x : x + 6] = 1.0
    return images, masks


def _fit(epochs: int = 2, **kw: object):
    return fit(
        _arrays(10, 0),
        _arrays(6, 1),
        TINY,
        learning_rate=1e-2,
        batch_size=4,
        epochs=epochs,
        seed=7,
        **kw,  # type: ignore[arg-type]
    )


class _Executions(keras.callbacks.Callback):
    """Counts calls into TensorFlow's training step (one per execution)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.calls += 1


def test_one_execution_runs_a_whole_epoch_with_the_same_result() -> None:
    keras.utils.set_random_seed(0)
    per_step, per_epoch = _Executions(), _Executions()
    one_step = _fit(steps_per_execution=1, callbacks=[per_step])
    default = _fit(callbacks=[per_epoch])
    # 10 slices in batches of 4: 3 steps per epoch, all in one call into TensorFlow
    assert per_step.calls == 2 * math.ceil(10 / 4)
    assert per_epoch.calls == 2
    # Grouping steps changes when Python is called, not what is computed.
    for key in ("loss", "val_loss", "val_dice"):
        np.testing.assert_allclose(default.history[key], one_step.history[key], rtol=1e-4)


def test_the_training_step_is_traced_once_per_compiled_model() -> None:
    """compile_unet builds the optimizer's slots: a first step that created them would be
    traced twice by tf.function (once more without creating them)."""
    import tensorflow as tf

    model = fit_module.compile_unet(16, TINY, 1e-2, 0, steps_per_execution=64)
    traces = []
    step = model.train_step
    model.train_step = lambda data: (traces.append(1), step(data))[1]  # type: ignore[method-assign]
    ds = tf.data.Dataset.from_tensor_slices(_arrays(10, 0)).batch(4)
    model.fit(ds, epochs=2, verbose=0)
    assert len(traces) == 1


def test_a_reused_compiled_model_trains_like_a_new_one() -> None:
    fit_module.forget_compiled_models()
    first = _fit()  # compiles (and traces) a new model
    # another fit in between: other data, seed, learning rate and batch size
    fit(_arrays(13, 5), _arrays(5, 6), TINY, learning_rate=3e-2, batch_size=8, epochs=1, seed=1)
    assert len(fit_module._COMPILED) == 1  # ... which reused it
    again = _fit()  # reused again, reset to a new model's state
    assert again.history == first.history
    # The results are copies: the first fit's weights survived the later fits.
    assert again.model is not first.model
    for a, b in zip(first.model.get_weights(), again.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_progress_is_one_line_per_epoch_and_quiet_by_default(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    _fit(epochs=2, progress="train: fold-0")
    # nobody configured the logger: nothing reaches stderr
    assert "epoch" not in capfd.readouterr().err
    with caplog.at_level(logging.INFO, logger="liverseg.progress"):
        _fit(epochs=3, progress="train: fold-1")
    lines = [r.getMessage() for r in caplog.records if r.name == "liverseg.progress"]
    assert len(lines) == 3
    for e, line in enumerate(lines, start=1):
        assert line.startswith(f"train: fold-1 epoch {e}/3  loss ")
        assert " val_dice " in line and line.endswith(" s")


def test_the_cli_sends_progress_to_stderr() -> None:
    code = (
        "import logging, sys; import liverseg; liverseg.show_progress(); "
        "logging.getLogger('liverseg.progress').info('train: fold-0 epoch 1/2'); "
        "logging.getLogger('liverseg.other').debug('hidden')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert proc.stderr == "train: fold-0 epoch 1/2\n" and proc.stdout == ""


def test_epoch_metrics_are_logged_from_step_1_and_flushed(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as run:
            logger = MlflowEpochLogger(run.info.run_id)  # asynchronous by default
            _fit(epochs=3, callbacks=[logger])
            assert logger._pending == []  # fit waited for every queued epoch
        client = mlflow.MlflowClient()
        for key in ("loss", "val_dice", "learning_rate"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3]
    finally:
        mlflow.set_tracking_uri(None)


def test_default_study_is_defined_by_its_trial_count() -> None:
    """The timeout is a safety net far above what the default study needs, so a slow machine
    runs the same trials as a fast one (a trial of the default study takes about a minute)."""
    tune = load_section("tune", REPO / "params.yaml")
    assert tune.timeout_s >= 30 * 60


def test_tensorflow_comes_from_exactly_one_extra() -> None:
    """tensorflow-cpu and tensorflow write the same package: the base dependencies name
    neither, the cpu and gpu extras one each, and the installed one is what models record."""
    import importlib.metadata
    import tomllib

    import tensorflow as tf

    from liverseg.tracking import tensorflow_distribution

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def tf_reqs(reqs: list[str]) -> list[str]:
        return [
            r for r in reqs if r.split("[")[0].split("==")[0] in ("tensorflow", "tensorflow-cpu")
        ]

    extras = project["optional-dependencies"]
    assert tf_reqs(project["dependencies"]) == []
    assert tf_reqs(extras["cpu"]) == [f"tensorflow-cpu=={tf.__version__}"]
    assert tf_reqs(extras["gpu"]) == [f"tensorflow[and-cuda]=={tf.__version__}"]
    assert all(tf_reqs(v) == [] for k, v in extras.items() if k not in ("cpu", "gpu"))
    assert importlib.metadata.version(tensorflow_distribution()) == tf.__version__


def _evaluate(model: keras.Model, images: np.ndarray, masks: np.ndarray) -> float:
    """Validation Dice of ``model`` (uncompiled, as fit returns it) on these slices."""
    from liverseg.model.keras_metrics import DiceCoefficient

    metric = DiceCoefficient(name="dice")
    metric.update_state(masks, model.predict(images, batch_size=32, verbose=0))
    return float(metric.result())


def test_val_stride_validates_every_kth_slice_and_reports_the_best_on_all() -> None:
    """Each epoch validates on val[::2]; ``best`` is the best epoch's model on all of val.
    The odd slices are made unlike the even ones (their masks are the squares' complement),
    so that the two Dice figures cannot agree by chance."""
    even_x, even_y = _arrays(6, 1)
    odd_x, odd_y = even_x.copy(), 1.0 - even_y
    val_x = np.stack([even_x, odd_x], axis=1).reshape(12, 16, 16, 1)
    val_y = np.stack([even_y, odd_y], axis=1).reshape(12, 16, 16, 1)
    res = fit(
        _arrays(10, 0),
        (val_x, val_y),
        TINY,
        learning_rate=1e-2,
        batch_size=4,
        epochs=3,
        seed=7,
        val_stride=2,
    )
    assert res.best_epoch is not None
    per_epoch = res.history["val_dice"][res.best_epoch]
    assert per_epoch == pytest.approx(_evaluate(res.model, even_x, even_y), abs=1e-4)
    assert res.best["val_dice"] == pytest.approx(_evaluate(res.model, val_x, val_y), abs=1e-4)
    assert abs(res.best["val_dice"] - per_epoch) > 0.01
    assert set(res.best) == {"val_loss", "val_dice", "val_iou"}


def test_val_stride_must_be_positive() -> None:
    with pytest.raises(ValueError, match="val_stride must be >= 1"):
        _fit(val_stride=0)
