"""Keras layers of the U-Net that Keras does not provide in the form we need.

:class:`FusedBatchNorm` is Keras' ``BatchNormalization`` (same variables, arguments, saved
config and semantics) computed with TensorFlow's fused kernel (``FusedBatchNormV3``, oneDNN on
CPUs). Keras 3 computes batch normalisation from ``ops.moments`` and element-wise ops, a chain
of about ten kernels per layer and as many again for the gradient; on the default 8-filter
U-Net that chain was 42 % of a training step on CPU (``benchmarks/bench_train.py --bn``).
"""

from __future__ import annotations

from typing import Any

import keras


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
