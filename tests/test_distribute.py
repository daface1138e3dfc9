"""``train.distribute: mirrored`` (tf.distribute.MirroredStrategy) on two logical CPU devices.

TensorFlow fixes its logical devices when it first initialises them, so the mirrored runs
happen in a fresh interpreter that splits the CPU in two before anything else.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from liverseg.errors import ParamsError
from liverseg.params import TrainParams

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    import keras
    import numpy as np

    from liverseg.errors import ParamsError
    from liverseg.params import AugmentParams, ModelParams, TrainParams
    from liverseg.training.crossval import ensemble
    from liverseg.training.fit import distribute_scope, fit, replicas

    rng = np.random.default_rng(0)
    x = rng.random((16, 32, 32, 1), dtype=np.float32)
    y = (x > 0.6).astype(np.float32)
    val = (x[:8], y[:8])
    out = {"replicas": replicas("mirrored")}

    # One plain SGD step on a global batch of 8: mirrored (4 + 4) must move the weights as one
    # device does (Adam would hide a gradient that is N times too large: it normalises it).
    from liverseg.model.losses import get_loss
    from liverseg.model.unet import build_unet

    deltas = {}
    for kind in ("none", "mirrored"):
        keras.utils.set_random_seed(3)
        with distribute_scope(kind, 8):
            m = build_unet(32, ModelParams(depth=2, base_filters=4, dropout=0.0,
                                           batch_norm=False), seed=3)
            m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5),
                      loss=get_loss("dice_bce"))
        before = [w.copy() for w in m.get_weights()]
        m.train_on_batch(x[:8], y[:8])
        deltas[kind] = np.concatenate(
            [(a - b).ravel() for a, b in zip(m.get_weights(), before)])
    out["sgd_step_norm"] = float(np.linalg.norm(deltas["none"]))
    out["sgd_step_diff"] = float(np.linalg.norm(deltas["mirrored"] - deltas["none"]))
    for kind in ("none", "mirrored"):
        # nothing random but the seeded shuffle: no dropout, no augmentation, and no batch
        # norm (its statistics are per replica, the one documented difference)
        cfg = TrainParams(
            model=ModelParams(depth=2, base_filters=4, dropout=0.0, batch_norm=False),
            augment=AugmentParams(rotate_deg=0, scale=0, intensity=0, blur_prob=0),
            distribute=kind,
        )
        res = fit((x, y), val, cfg.spec, learning_rate=3e-3, batch_size=8, epochs=2, seed=1,
                  distribute=kind)
        out[kind] = {
            "loss": res.history["loss"],
            "val_dice": res.history["val_dice"],
            "strategy": type(res.model.distribute_strategy).__name__,
        }
        if kind == "mirrored":
            other = fit((x, y), None, cfg.spec, learning_rate=3e-3, batch_size=8, epochs=1,
                        seed=2, distribute=kind)
            ens = ensemble([res.model, other.model])  # built outside the strategy's scope
            path = sys.argv[1] + "/ensemble.keras"
            ens.save(path)
            back = keras.saving.load_model(path, compile=False)
            out["ensemble_max_diff"] = float(
                np.abs(back.predict(x, verbose=0) - ens.predict(x, verbose=0)).max()
            )
            try:
                fit((x, y), None, cfg.spec, learning_rate=3e-3, batch_size=5, epochs=1, seed=1,
                    distribute=kind)
                out["odd_batch"] = "accepted"
            except ParamsError as exc:
                out["odd_batch"] = str(exc)
    print(json.dumps(out))
    """
)


def test_unknown_distribute_is_a_params_error() -> None:
    with pytest.raises(ParamsError, match="train.distribute"):
        TrainParams(distribute="horovod")


@pytest.mark.slow
def test_mirrored_on_two_cpu_devices_takes_the_same_steps(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": str(Path(sys.executable).parent)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["mirrored"]["strategy"] == "MirroredStrategy"
    assert out["none"]["strategy"] != "MirroredStrategy"
    # The global batch of 8 split 4 + 4, the same learning rate: the same step ...
    assert out["sgd_step_norm"] > 1e-3
    assert out["sgd_step_diff"] < 1e-3 * out["sgd_step_norm"]
    # ... and the same training with Adam, up to rounding (the convolutions round differently
    # on 4 slices than on 8, and Adam turns the sign of a near-zero gradient into a full step)
    assert out["mirrored"]["loss"] == pytest.approx(out["none"]["loss"], rel=3e-3)
    # (the thresholded validation Dice moves more: a pixel near 0.5 flips)
    assert out["mirrored"]["val_dice"] == pytest.approx(out["none"]["val_dice"], abs=0.03)
    assert out["none"]["loss"][-1] < out["none"]["loss"][0]  # it did train
    assert out["ensemble_max_diff"] < 1e-6
    assert "divisible by 2" in out["odd_batch"] and "got 5" in out["odd_batch"]
