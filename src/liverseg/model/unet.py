"""2-D U-Net for binary liver segmentation of axial CT slices.

Shape contract: the model maps ``(N, H, W, 1)`` float32 slices (HU windowed, scaled to [0, 1])
to ``(N, H, W, 1)`` float32 sigmoid probabilities of "liver". ``H`` and ``W`` are free (the
input is declared ``(None, None, 1)``) but must each be divisible by ``2**depth`` so that every
max-pool halves exactly and the decoder's upsampled maps line up with their skip connections.
This lets a model trained on 96x96 crops run on other sizes at inference.

Layer names: ``enc{k}_conv{1,2}`` / ``_bn{1,2}`` / ``_relu{1,2}`` / ``_pool`` for encoder level
``k`` (0 = full resolution), ``bottleneck_*``, ``dec{k}_up`` / ``_concat`` / ``_conv{1,2}`` ... for
the decoder level that returns to the resolution of ``enc{k}``, ``logits`` (1x1 conv) and
``mask`` (the sigmoid, always float32 so the model is usable under ``mixed_bfloat16``).

Batch normalisation is :class:`FusedBatchNorm`: Keras 3 computes it from ``ops.moments`` and
element-wise ops, a chain of about ten kernels per layer and as many again for the gradient; on
the default 8-filter U-Net that chain was 42 % of a training step on CPU
(``benchmarks/bench_train.py --bn``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import keras

from liverseg.errors import ParamsError
from liverseg.params import ModelParams

KERNEL_SIZE = 3
BN_MOMENTUM = 0.9
POOL = 2


@keras.saving.register_keras_serializable(package="liverseg")
class FusedBatchNorm(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` over the last axis of NHWC float32 tensors, with the
    fused TensorFlow kernel.

    The moving statistics follow Keras' rule ``moving = momentum * moving + (1 - momentum) *
    batch``; the only difference is the batch variance folded into ``moving_variance``, which the
    fused kernel takes unbiased (times ``n / (n - 1)`` for ``n`` values per channel: at least
    144 in the default model, so at most 0.7 %). The normalised output uses the biased
    variance, as Keras does. Any other case (another axis or rank, ``mixed_bfloat16``,
    renormalisation, masks, a backend other than TensorFlow) runs Keras' own code.
    """

    def _fusable(self, inputs: Any, mask: Any) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.renorm
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.center
            and self.scale
            and self.compute_dtype == "float32"
            and not self.synchronized
        )

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        training = bool(training and self.trainable)
        # Training: with exponential_avg_factor the kernel returns the updated moving
        # statistics. Inference: it normalises with them.
        extra = {"exponential_avg_factor": 1.0 - self.momentum} if training else {}
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs,
            self.gamma,
            self.beta,
            mean=self.moving_mean,
            variance=self.moving_variance,
            epsilon=self.epsilon,
            is_training=training,
            **extra,
        )
        if training:
            self.moving_mean.assign(mean)
            self.moving_variance.assign(variance)
        return y


# Seeds: a distinct one per initializer (seed + 1, seed + 2, ...), or None for fresh weights.
# Keras 3 initializers with an integer seed return the same values on every call, so one shared
# seeded initializer would give every layer of the same shape identical weights.
Seeds = Iterator[int | None]


def _conv_block(
    x: keras.KerasTensor, filters: int, prefix: str, params: ModelParams, seeds: Seeds
) -> keras.KerasTensor:
    """Two 3x3 same-padded convolutions, each followed by optional BatchNorm and ReLU."""
    for i in (1, 2):
        x = keras.layers.Conv2D(
            filters,
            KERNEL_SIZE,
            padding="same",
            kernel_initializer=keras.initializers.HeNormal(seed=next(seeds)),
            # A bias right before BatchNorm is cancelled by its mean subtraction.
            use_bias=not params.batch_norm,
            name=f"{prefix}_conv{i}",
        )(x)
        if params.batch_norm:
            # momentum 0.9, not Keras' 0.99: with a few dozen steps per epoch the moving
            # statistics must follow the weights within an epoch, or validation (which uses
            # them) lags training by several epochs and swings from epoch to epoch.
            x = FusedBatchNorm(momentum=BN_MOMENTUM, name=f"{prefix}_bn{i}")(x)
        x = keras.layers.ReLU(name=f"{prefix}_relu{i}")(x)
    return x


def build_unet(
    image_size: int | None, params: ModelParams, *, seed: int | None = None, channels: int = 1
) -> keras.Model:
    """Build the (uncompiled) U-Net described in the module docstring.

    ``image_size`` only validates the training size against ``params.depth``; the model itself
    accepts any ``H, W`` divisible by ``2**depth``. ``seed`` makes initial weights and dropout
    masks reproducible (``None``: fresh random weights). ``channels``: 1, or 3 for a slice
    with its neighbours (``prepare.context_mm``).
    """
    factor = 2**params.depth
    if image_size is not None and (image_size < factor or image_size % factor != 0):
        raise ParamsError(
            f"params: prepare.image_size={image_size} must be a positive multiple of "
            f"2**train.model.depth={factor} (depth {params.depth})"
        )
    seeds: Seeds = itertools.repeat(None) if seed is None else itertools.count(seed + 1)
    inputs = keras.Input(shape=(None, None, channels), name="image")
    x = inputs
    skips: list[keras.KerasTensor] = []
    for level in range(params.depth):
        x = _conv_block(x, params.base_filters * 2**level, f"enc{level}", params, seeds)
        skips.append(x)
        x = keras.layers.MaxPooling2D(POOL, name=f"enc{level}_pool")(x)

    x = _conv_block(x, params.base_filters * 2**params.depth, "bottleneck", params, seeds)
    if params.dropout > 0:
        x = keras.layers.Dropout(params.dropout, seed=next(seeds), name="bottleneck_dropout")(x)

    for level in reversed(range(params.depth)):
        filters = params.base_filters * 2**level
        x = keras.layers.Conv2DTranspose(
            filters,
            POOL,
            strides=POOL,
            padding="same",
            kernel_initializer=keras.initializers.HeNormal(seed=next(seeds)),
            name=f"dec{level}_up",
        )(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters, f"dec{level}", params, seeds)

    logits = keras.layers.Conv2D(
        1,
        1,
        kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
        name="logits",
    )(x)
    # Under mixed_bfloat16 the logits are bfloat16; the sigmoid (and so the loss) runs in
    # float32 to keep probabilities near 0/1 resolvable.
    outputs = keras.layers.Activation("sigmoid", dtype="float32", name="mask")(logits)
    return keras.Model(inputs, outputs, name=f"unet_d{params.depth}_f{params.base_filters}")


def count_flops(model: keras.Model, image_size: int) -> float:
    """Approximate forward FLOPs for one ``image_size`` x ``image_size`` slice.

    Counts only convolutions (2 FLOPs per multiply-accumulate); BatchNorm, ReLU, pooling and
    the sigmoid add well under 1 %. Used to report model cost next to its Dice. Nested models
    (the fold ensemble) count as the sum of their members.
    """
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if nested:
        return sum(count_flops(m, image_size) for m in nested)
    convs = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D | keras.layers.Conv2DTranspose)
    ]
    if not convs:
        return 0.0
    probe = keras.Model(model.inputs, [layer.output for layer in convs])
    in_shape = (1, image_size, image_size, model.inputs[0].shape[-1])
    specs = keras.tree.flatten(probe.compute_output_spec(keras.KerasTensor(in_shape)))
    total = 0.0
    for layer, spec in zip(convs, specs, strict=True):
        _, h, w, _ = spec.shape
        # A transposed conv's kernel is (kh, kw, out, in): each *input* pixel scatters kh*kw*out
        # MACs, so its count is over the input's pixels, its output's divided by the strides.
        sh, sw = layer.strides if isinstance(layer, keras.layers.Conv2DTranspose) else (1, 1)
        total += 2.0 * (h // sh) * (w // sw) * math.prod(layer.kernel.shape)
    return total
