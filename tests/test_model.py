"""U-Net shapes/params/precision, losses and metrics against hand values, save/load round trip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

from liverseg.errors import ParamsError
from liverseg.model.keras_metrics import CUSTOM_OBJECTS, DiceCoefficient, IoU
from liverseg.model.losses import dice_bce_loss, dice_loss, get_loss
from liverseg.model.optimizers import FusedAdam
from liverseg.model.unet import build_unet, count_flops
from liverseg.params import ModelParams


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(1234)


@pytest.fixture
def bf16_policy() -> Iterator[None]:
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _tiny(**kw: object) -> ModelParams:
    base = {"depth": 1, "base_filters": 2, "dropout": 0.0, "batch_norm": False}
    base.update(kw)
    return ModelParams(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ U-Net
@pytest.mark.parametrize(
    ("depth", "train_size", "height", "width"),
    [
        (1, 16, 16, 16),
        (2, 64, 64, 96),  # non-square
        (3, 32, 32, 32),
        (4, 96, 48, 80),  # built for 96, run on another, non-square size
        (2, None, 12, 20),  # no training size given
    ],
)
def test_unet_output_shape(depth: int, train_size: int | None, height: int, width: int) -> None:
    model = build_unet(train_size, ModelParams(depth=depth, base_filters=4), seed=0)
    out = model(np.zeros((2, height, width, 1), np.float32), training=False)
    assert tuple(out.shape) == (2, height, width, 1)
    assert model.input_shape == (None, None, None, 1)


# Hand counts for depth 1 (enc0 -> bottleneck -> dec0): conv weights 9*in*out (+out bias
# without BN), BN 4 per channel (gamma, beta, moving mean/var), 2x2 transpose conv
# 4*in*out + out, 1x1 logits conv in + 1.
#   base 2, no BN: 20 + 38 + 76 + 148 + 34 + 74 + 38 + 3 = 431
#   base 2, BN:    26 + 44 + 88 + 160 + 34 + 80 + 44 + 3 = 479
#   base 4, no BN: 40 + 148 + 296 + 584 + 132 + 292 + 148 + 5 = 1645
@pytest.mark.parametrize(
    ("base_filters", "batch_norm", "expected"),
    [(2, False, 431), (2, True, 479), (4, False, 1645)],
)
def test_unet_param_count(base_filters: int, batch_norm: bool, expected: int) -> None:
    model = build_unet(16, _tiny(base_filters=base_filters, batch_norm=batch_norm))
    assert model.count_params() == expected


def test_param_count_grows_with_base_filters() -> None:
    counts = [build_unet(32, ModelParams(depth=2, base_filters=f)).count_params() for f in (4, 8)]
    assert counts[1] > 3 * counts[0]  # conv weights scale ~ filters**2


def test_unet_outputs_are_probabilities() -> None:
    model = build_unet(32, ModelParams(depth=2, base_filters=4, dropout=0.2), seed=3)
    x = np.random.default_rng(0).normal(0, 5, size=(3, 32, 32, 1)).astype(np.float32)
    out = np.asarray(model(x, training=False))
    assert out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))
    assert out.std() > 0  # not a constant map


def test_unet_layer_names_and_output_layer() -> None:
    model = build_unet(32, ModelParams(depth=2, base_filters=4, dropout=0.1, batch_norm=True))
    names = {layer.name for layer in model.layers}
    expected = {"image", "enc0_conv1", "enc1_bn2", "enc1_pool", "bottleneck_dropout", "dec0_up"}
    assert expected | {"dec1_concat", "logits", "mask"} <= names
    assert model.layers[-1].name == "mask"


def test_unet_seed_reproducible() -> None:
    params = ModelParams(depth=2, base_filters=4)
    w1 = build_unet(32, params, seed=7).get_weights()
    w2 = build_unet(32, params, seed=7).get_weights()
    w3 = build_unet(32, params, seed=8).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(w1, w2, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(w1, w3, strict=True))
    # distinct seeds per layer: the two same-shaped enc0 convs must not share weights
    model = build_unet(32, params, seed=7)
    k1 = model.get_layer("enc1_conv2").kernel.numpy()
    k2 = model.get_layer("dec1_conv2").kernel.numpy()
    assert k1.shape == k2.shape and not np.array_equal(k1, k2)


@pytest.mark.parametrize(("image_size", "depth"), [(100, 3), (8, 4), (24, 4)])
def test_unet_rejects_indivisible_size(image_size: int, depth: int) -> None:
    with pytest.raises(ParamsError, match=r"prepare\.image_size.*train\.model\.depth"):
        build_unet(image_size, ModelParams(depth=depth))


def test_unet_mixed_bfloat16(bf16_policy: None) -> None:
    model = build_unet(32, ModelParams(depth=2, base_filters=4), seed=0)
    assert model.get_layer("enc0_conv1").compute_dtype == "bfloat16"
    assert model.get_layer("mask").compute_dtype == "float32"
    out = model(np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.all(np.isfinite(np.asarray(out)))
    # the losses and metrics run on bfloat16 models too (they cast to float32)
    model.compile(optimizer="adam", loss=dice_bce_loss, metrics=[DiceCoefficient(), IoU()])
    x = np.random.default_rng(1).random((4, 32, 32, 1), dtype=np.float32)
    logs = model.fit(x, (x > 0.5).astype(np.float32), batch_size=2, epochs=1, verbose=0)
    assert all(np.isfinite(logs.history[k][0]) for k in ("loss", "dice", "iou"))


def test_bf16_fixture_restored_policy() -> None:
    assert keras.mixed_precision.global_policy().name == "float32"


def test_count_flops_hand_value() -> None:
    # depth 1, base 2, 16x16: 2*H*W*k*k*in*out per conv, transposed conv on its 8x8 input:
    # enc 9216 + 18432, bottleneck (8x8) 9216 + 18432, up 4096, dec 36864 + 18432, logits 1024
    model = build_unet(16, _tiny())
    assert count_flops(model, 16) == pytest.approx(115712.0)
    assert count_flops(model, 32) == pytest.approx(4 * 115712.0)


# ----------------------------------------------------------------------------------- losses
def _img(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, np.float32)[None, :, :, None]


T4 = _img([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # 4 foreground pixels
SHIFT2 = _img([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # overlaps T4 in 2
ELSEWHERE = _img([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
HALF = np.full_like(T4, 0.5)
EMPTY = np.zeros_like(T4)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "smooth", "expected"),
    [
        (T4, T4, 1.0, 0.0),  # perfect
        (T4, ELSEWHERE, 1.0, 1 - 1 / 9),  # all wrong: (0 + 1) / (8 + 1)
        (T4, ELSEWHERE, 0.0, 1.0),
        (T4, SHIFT2, 1.0, 1 - 5 / 9),  # half overlap: (2*2 + 1) / (4 + 4 + 1)
        (T4, SHIFT2, 0.0, 0.5),  # 2*2 / 8
        (T4, HALF, 1.0, 1 - 5 / 13),  # soft: 2*(4*0.5) + 1 / (4 + 8 + 1)
        (EMPTY, EMPTY, 1.0, 0.0),  # liver-free slice predicted empty
        (np.concatenate([T4, T4]), np.concatenate([T4, ELSEWHERE]), 1.0, (0 + 8 / 9) / 2),
    ],
)
def test_dice_loss_hand_values(
    y_true: np.ndarray, y_pred: np.ndarray, smooth: float, expected: float
) -> None:
    per_image = np.asarray(dice_loss(y_true, y_pred, smooth=smooth))
    assert per_image.shape == (len(y_true),)  # Keras averages over the batch
    assert float(per_image.mean()) == pytest.approx(expected, abs=1e-6)


def test_dice_loss_accepts_bfloat16() -> None:
    import tensorflow as tf

    loss = dice_loss(tf.constant(T4), tf.cast(tf.constant(SHIFT2), tf.bfloat16))
    assert loss.dtype == tf.float32
    assert float(loss[0]) == pytest.approx(4 / 9, abs=1e-6)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "expected_bce"),
    [
        (T4, HALF, np.log(2.0)),  # -log(0.5) at every pixel
        (T4, T4 * 0.9 + (1 - T4) * 0.1, -np.log(0.9)),
    ],
)
def test_dice_bce_is_bce_plus_dice(
    y_true: np.ndarray, y_pred: np.ndarray, expected_bce: float
) -> None:
    total = float(dice_bce_loss(y_true, y_pred)[0])
    assert total == pytest.approx(expected_bce + float(dice_loss(y_true, y_pred)[0]), abs=1e-5)


@pytest.mark.parametrize(("name", "fn"), [("dice", dice_loss), ("dice_bce", dice_bce_loss)])
def test_get_loss(name: str, fn: object) -> None:
    assert get_loss(name) is fn


@pytest.mark.parametrize("name", ["bce", "Dice", ""])
def test_get_loss_unknown(name: str) -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss(name)


# ---------------------------------------------------------------------------------- metrics
B1_TRUE = _img([[1, 1], [0, 0]])
B1_PRED = _img([[0.9, 0.4], [0.6, 0.1]])
B2_TRUE = _img([[1, 0], [0, 0]])
B2_PRED = _img([[0.7, 0.2], [0.3, 0.5]])  # 0.5 counts as foreground at threshold 0.5


# threshold 0.5: batch 1 I=1 T=2 P=2, batch 2 I=1 T=1 P=2 -> pooled I=2 T=3 P=4
# threshold 0.65: batch 1 I=1 T=2 P=1, batch 2 I=1 T=1 P=1 -> pooled I=2 T=3 P=2
@pytest.mark.parametrize(
    ("cls", "threshold", "after_first", "after_both"),
    [
        (DiceCoefficient, 0.5, 2 / 4, 4 / 7),
        (IoU, 0.5, 1 / 3, 2 / 5),
        (DiceCoefficient, 0.65, 2 / 3, 4 / 5),
        (IoU, 0.65, 1 / 2, 2 / 3),
    ],
)
def test_metrics_accumulate_over_batches(
    cls: type, threshold: float, after_first: float, after_both: float
) -> None:
    metric = cls(threshold=threshold)
    metric.update_state(B1_TRUE, B1_PRED)
    assert float(metric.result()) == pytest.approx(after_first)
    metric.update_state(B2_TRUE, B2_PRED)
    assert float(metric.result()) == pytest.approx(after_both)


@pytest.mark.parametrize(("cls", "only_second"), [(DiceCoefficient, 2 / 3), (IoU, 1 / 2)])
def test_metrics_reset(cls: type, only_second: float) -> None:
    metric = cls()
    metric.update_state(B1_TRUE, B1_PRED)
    metric.reset_state()
    assert float(metric.result()) == 1.0  # nothing seen: no foreground anywhere
    metric.update_state(B2_TRUE, B2_PRED)
    assert float(metric.result()) == pytest.approx(only_second)


@pytest.mark.parametrize(("cls", "expected"), [(DiceCoefficient, 0.0), (IoU, 0.0)])
def test_metrics_prediction_on_empty_truth(cls: type, expected: float) -> None:
    metric = cls()
    metric.update_state(EMPTY, T4)
    assert float(metric.result()) == expected


def test_metrics_refuse_sample_weights() -> None:
    # Training weighs no samples; a weight would otherwise be ignored silently.
    with pytest.raises(ValueError, match="sample weights are not supported"):
        DiceCoefficient().update_state(B1_TRUE, B1_PRED, sample_weight=np.array([1.0]))


@pytest.mark.parametrize("cls", [DiceCoefficient, IoU])
def test_metrics_config_round_trip(cls: type) -> None:
    metric = cls(name="val_overlap", threshold=0.3)
    clone = cls.from_config(metric.get_config())
    assert clone.name == "val_overlap" and clone.threshold == 0.3
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert type(restored) is cls and restored.threshold == 0.3


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1])
def test_metrics_reject_bad_threshold(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        DiceCoefficient(threshold=threshold)


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((4, 16, 16, 1), dtype=np.float32)
    y = (x > 0.5).astype(np.float32)
    model = build_unet(16, _tiny(batch_norm=True, dropout=0.1), seed=0)
    model.compile(
        optimizer=FusedAdam(1e-3),
        loss=get_loss("dice_bce"),
        metrics=[DiceCoefficient(threshold=0.4), IoU()],
    )
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS)
    assert isinstance(loaded.optimizer, FusedAdam)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(1e-3)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )
    before = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    after = loaded.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    assert {"loss", "dice", "iou"} <= set(after)
    for key in ("loss", "dice", "iou"):
        assert after[key] == pytest.approx(before[key], abs=1e-5)
    thresholds = [m.threshold for m in _flat_metrics(loaded) if isinstance(m, DiceCoefficient)]
    assert thresholds == [0.4]


def _flat_metrics(model: keras.Model) -> list[object]:
    out: list[object] = []
    stack = list(model.metrics)
    while stack:
        m = stack.pop()
        out.append(m)
        stack.extend(getattr(m, "metrics", []) or [])
    return out


@pytest.mark.parametrize(
    ("key", "obj"),
    [
        ("liverseg>dice_loss", dice_loss),
        ("liverseg>dice_bce_loss", dice_bce_loss),
        ("liverseg>DiceCoefficient", DiceCoefficient),
        ("liverseg>IoU", IoU),
        ("liverseg>FusedAdam", FusedAdam),
    ],
)
def test_custom_objects_use_saved_names(key: str, obj: object) -> None:
    assert CUSTOM_OBJECTS[key] is obj
    assert keras.saving.get_registered_object(key) is obj


# ------------------------------------------------------------------------------ FusedBatchNorm
def test_fused_batch_norm_matches_keras_batch_normalization(tmp_path: Path) -> None:
    import tensorflow as tf

    from liverseg.model.unet import FusedBatchNorm

    x = tf.constant(np.random.default_rng(0).normal(2, 3, (4, 12, 12, 5)).astype("float32"))
    ours, keras_bn = FusedBatchNorm(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    for layer in (ours, keras_bn):
        layer.build(x.shape)
        layer.gamma.assign(np.arange(1, 6, dtype="float32"))
    n = 4 * 12 * 12  # values per channel: the fused kernel folds in the unbiased variance
    for _ in range(2):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y_ours, y_keras = ours(x, training=True), keras_bn(x, training=True)
            loss_ours, loss_keras = tf.reduce_sum(y_ours**3), tf.reduce_sum(y_keras**3)
        np.testing.assert_allclose(y_ours, y_keras, atol=1e-5)
        for ours_var, keras_var in (
            (x, x),
            (ours.gamma, keras_bn.gamma),
            (ours.beta, keras_bn.beta),
        ):
            g_ours, g_keras = (
                tape.gradient(loss_ours, ours_var),
                tape.gradient(loss_keras, keras_var),
            )
            np.testing.assert_allclose(
                g_ours, g_keras, rtol=1e-4, atol=1e-4 * np.abs(g_keras).max()
            )
        np.testing.assert_allclose(ours.moving_mean, keras_bn.moving_mean, atol=1e-6)
    # after two steps of momentum 0.9 the moving variance holds 0.19 of the batch variance
    ratio = ours.moving_variance.numpy() / keras_bn.moving_variance.numpy()
    assert np.all(ratio > 1) and np.all(ratio < 1 + 1 / (n - 1))
    np.testing.assert_allclose(
        ours(x, training=False), keras_bn(x, training=False), rtol=2e-3, atol=2e-3
    )

    # a model with it saves and loads (registered), and the loaded layer is ours
    inp = keras.Input((12, 12, 5))
    model = keras.Model(inp, ours(inp))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[-1], FusedBatchNorm)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-6)


# ------------------------------------------------------------------------------ FusedAdam
def _adam_steps(
    opt: keras.optimizers.Optimizer, grads: list[np.ndarray], *, compiled: bool
) -> tuple[list[keras.Variable], list[str]]:
    """Variables after ``opt`` applied each of ``grads`` (one step each) to fixed start values,
    and the op types of one traced step."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    variables = [
        keras.Variable(rng.normal(size=shape).astype(np.float32))
        for shape in ((3, 3, 1, 4), (4,), (2, 2, 4, 8))
    ]
    opt.build(variables)

    def step(gs: list[tf.Tensor]) -> None:
        opt.apply(gs, variables)

    fn = tf.function(step) if compiled else step
    for g in grads:
        fn([tf.constant(x) for x in g])
    graph = tf.function(step).get_concrete_function([tf.constant(x) for x in grads[0]]).graph
    return variables, [op.type for op in graph.get_operations()]


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_adam_matches_keras_adam(compiled: bool) -> None:
    rng = np.random.default_rng(0)
    shapes = ((3, 3, 1, 4), (4,), (2, 2, 4, 8))
    # gradients of varying scale and sign over 6 steps (bias correction matters early on)
    grads = [
        [rng.normal(scale=10.0 ** rng.integers(-3, 2), size=s).astype(np.float32) for s in shapes]
        for _ in range(6)
    ]
    ours, ops_ours = _adam_steps(FusedAdam(learning_rate=0.01), grads, compiled=compiled)
    theirs, ops_theirs = _adam_steps(
        keras.optimizers.Adam(learning_rate=0.01), grads, compiled=compiled
    )
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    # one fused kernel per variable, none of Keras' element-wise update ops
    assert ops_ours.count("ResourceApplyAdam") == len(shapes)
    assert "ResourceApplyAdam" not in ops_theirs
    assert len(ops_ours) < len(ops_theirs) / 2


def test_fused_adam_falls_back_to_keras_for_amsgrad() -> None:
    rng = np.random.default_rng(0)
    grads = [
        [rng.normal(size=s).astype(np.float32) for s in ((3, 3, 1, 4), (4,), (2, 2, 4, 8))]
        for _ in range(3)
    ]
    ours, ops_ours = _adam_steps(FusedAdam(0.01, amsgrad=True), grads, compiled=True)
    theirs, _ = _adam_steps(keras.optimizers.Adam(0.01, amsgrad=True), grads, compiled=True)
    assert "ResourceApplyAdam" not in ops_ours
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_fused_adam_config_round_trip() -> None:
    opt = FusedAdam(learning_rate=0.004, beta_1=0.8, epsilon=1e-6)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert type(restored) is FusedAdam
    assert restored.get_config() == opt.get_config()
